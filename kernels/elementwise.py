"""Elementwise fused ops with their tangents: activations (GELU exact/tanh, SiLU) and the gated residual.

Activations, on the flat tensor (BLOCK elements per program), f and its derivative f' in float32 (KERNELS.md §2):
    SiLU       f = x·σ(x),                    f' = σ(x)·(1 + x·(1 − σ(x)))
    GELU exact f = x·Φ(x),                    f' = Φ(x) + x·φ(x)
    GELU tanh  f = ½x(1 + tanh u),            f' = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²),
               u = √(2/π)(x + 0.044715x³)
`activation_kernel` writes y = f(x) (WRITE_Y) and v' = f'(x)·v (HAS_V): v = ẋ gives the tangent in the same pass,
and v = dy with WRITE_Y=False is the backward dx.

Gated residual, one program per row [D] (gate row r // group, see kernels/rows.py):
    out = x + g⊙y,   ȯut = ẋ + ġ⊙y + g⊙ẏ;   backward: dx = dout, dy = g⊙dout, dg = Σ dout⊙y over the rows sharing
    a gate row (float32 partial sums per program, added by the host).
"""
import triton
import triton.language as tl

from flowkern.kernels.rows import load_row, row_offsets, store_row

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
def gated_residual_fwd_kernel(
    X, G, Y, XT, GT, YT, OUT, OUTT,
    stride_x, stride_g, stride_y, stride_xt, stride_gt, stride_yt, stride_out, stride_outt,
    n_cols, group, HAS_TANGENT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = x + g⊙y and (HAS_TANGENT) ȯut = ẋ + ġ⊙y + g⊙ẏ for one row. Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    g_row = row // group
    cols, mask = row_offsets(n_cols, BLOCK_D)
    x = load_row(X, row, stride_x, cols, mask)  # [BLOCK_D]
    g = load_row(G, g_row, stride_g, cols, mask)  # [BLOCK_D]
    y = load_row(Y, row, stride_y, cols, mask)  # [BLOCK_D]
    store_row(OUT, row, stride_out, cols, mask, x + g * y)
    if HAS_TANGENT:
        out_t = load_row(XT, row, stride_xt, cols, mask) + load_row(GT, g_row, stride_gt, cols, mask) * y \
            + g * load_row(YT, row, stride_yt, cols, mask)
        store_row(OUTT, row, stride_outt, cols, mask, out_t)


@triton.jit
def gated_residual_bwd_kernel(
    G, Y, DOUT, DY, DG_PART, stride_g, stride_y, stride_dout, stride_dy,
    n_cols, group, rows_per_prog, n_chunks, NEED_DY: tl.constexpr, NEED_DG: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dy = g⊙dout per row and float32 partial sums of dout⊙y (the gate gradient).

    Grid: (n_groups, n_chunks), rows as in kernels/norms.py::norm_bwd_kernel; partials [n_groups, n_chunks, D].
    """
    gi = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols, mask = row_offsets(n_cols, BLOCK_D)
    if NEED_DY:
        g = load_row(G, gi, stride_g, cols, mask)  # [BLOCK_D]
    dg_acc = tl.zeros([BLOCK_D], tl.float32)
    first = c * rows_per_prog
    for i in range(0, tl.minimum(rows_per_prog, group - first)):
        row = gi * group + first + i
        dout = load_row(DOUT, row, stride_dout, cols, mask)  # [BLOCK_D]
        if NEED_DY:
            store_row(DY, row, stride_dy, cols, mask, g * dout)
        if NEED_DG:
            dg_acc += load_row(Y, row, stride_y, cols, mask) * dout
    if NEED_DG:
        tl.store(DG_PART + (gi * n_chunks + c) * n_cols + cols, dg_acc, mask=mask)
