"""Activations with their tangents, on the flat tensor (BLOCK elements per program), f and f' in float32:
    SiLU       f = x·σ(x),                    f' = σ(x)·(1 + x·(1 − σ(x)))
    GELU exact f = x·Φ(x),                    f' = Φ(x) + x·φ(x)
    GELU tanh  f = ½x(1 + tanh u),            f' = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²),
               u = √(2/π)(x + 0.044715x³)
`activation_kernel` writes y = f(x) (WRITE_Y) and v' = f'(x)·v (HAS_V): v = ẋ gives the tangent in the same pass,
and v = dy with WRITE_Y=False is the backward dx.
Reverse over forward: ẏ = f'(x)·ẋ, so for a cotangent ḡ of ẏ the gradient of ẋ is f'(x)·ḡ (the backward) and that of
x is f''(x)·ẋ·ḡ (`curvature_kernel`), with
    SiLU       f'' = σ(1 − σ)·(2 + x·(1 − 2σ))
    GELU exact f'' = φ(x)·(2 − x²)
    GELU tanh  f'' = (1 − tanh²u)·(u' + ½x·(u'' − 2·tanh u·u'²)),  u' = √(2/π)(1 + 3·0.044715x²), u'' = √(2/π)·6·0.044715x
"""
import triton
import triton.language as tl

ACT_SILU, ACT_GELU, ACT_GELU_TANH = 0, 1, 2  # the ACT flag (literals in the kernel: √(2/π), 1/√2, 1/√(2π))


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """(f(x), f'(x)) in float32 for a float32 block x."""
    if ACT == 0:  # SiLU
        sig = tl.sigmoid(x)
        f = x * sig
        df = sig * (1.0 + x * (1.0 - sig))
    elif ACT == 1:  # GELU, exact
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        f = x * cdf
        df = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:  # GELU, tanh approximation; tanh(u) = 2σ(2u) − 1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        f = 0.5 * x * (1.0 + th)
        df = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    return f, df


@triton.jit
def activation_kernel(X, V, Y, YV, n_elements, ACT: tl.constexpr, WRITE_Y: tl.constexpr, HAS_V: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Y = f(X) (WRITE_Y) and YV = f'(X)·V (HAS_V) on contiguous flat tensors. Grid: (cdiv(n_elements, BLOCK),)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    f, df = _act_and_grad(x, ACT)
    if WRITE_Y:
        tl.store(Y + offs, f.to(Y.dtype.element_ty), mask=mask)
    if HAS_V:
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(YV + offs, (df * v).to(YV.dtype.element_ty), mask=mask)


@triton.jit
def _second_derivative(x, ACT: tl.constexpr):
    """f''(x) in float32 for a float32 block x (formulas in the module docstring)."""
    if ACT == 0:  # SiLU
        sig = tl.sigmoid(x)
        d2 = sig * (1.0 - sig) * (2.0 + x * (1.0 - 2.0 * sig))
    elif ACT == 1:  # GELU, exact
        d2 = 0.3989422804014327 * tl.exp(-0.5 * x * x) * (2.0 - x * x)
    else:  # GELU, tanh approximation
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        d2u = 0.7978845608028654 * 0.26829 * x
        d2 = (1.0 - th * th) * (du + 0.5 * x * (d2u - 2.0 * th * du * du))
    return d2


@triton.jit
def curvature_kernel(X, V, G, OUT, n_elements, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """OUT = f''(X)·V·G on contiguous flat tensors. Grid: (cdiv(n_elements, BLOCK),)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (_second_derivative(x, ACT) * v * g).to(OUT.dtype.element_ty), mask=mask)
