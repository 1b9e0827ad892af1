"""GELU (exact and tanh) and SiLU with a fused forward-mode rule: y = f(x), ẏ = f'(x)·ẋ in one pass."""
from __future__ import annotations

from flowkern._dispatch import select_backend
from flowkern._validate import check_like, check_tensor
from flowkern._fused import apply_dual, apply_explicit, primal
from flowkern.ops.activations.op import ActivationOp

APPROXIMATIONS = ("none", "tanh")


def _op(name, x, kind) -> ActivationOp:
    check_tensor("x", x)
    return ActivationOp(name, select_backend(name, x.device, x.dtype), kind)


def _gelu_kind(approximate) -> str:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return "gelu" if approximate == "none" else "gelu_tanh"


def gelu(x, approximate="none"):
    """`F.gelu(x, approximate=approximate)` with a fused forward-mode rule (ẏ = f'(x)·ẋ, one pass).

    Exact: f = x·Φ(x), f' = Φ(x) + x·φ(x). 'tanh': f = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³).
    x: any shape, float16/bfloat16/float32 (float64 on the PyTorch backend); math in float32.
    """
    return apply_dual(_op("flowkern.ops.gelu", primal(x), _gelu_kind(approximate)), x)


def gelu_jvp(x, x_t, approximate="none"):
    """(gelu(x), gelu'(x)·x_t) from one pass. The tangent is differentiable (reverse over forward)."""
    op = _op("flowkern.ops.gelu_jvp", x, _gelu_kind(approximate))
    check_like("x_t", x_t, "x", x)
    return apply_explicit(op, (x,), (x_t,))


def silu(x):
    """`F.silu(x)` with a fused forward-mode rule: f = x·σ(x), f' = σ(x)(1 + x(1 − σ(x))). Shapes as `gelu`."""
    return apply_dual(_op("flowkern.ops.silu", primal(x), "silu"), x)


def silu_jvp(x, x_t):
    """(silu(x), silu'(x)·x_t) from one pass. The tangent is differentiable (reverse over forward)."""
    op = _op("flowkern.ops.silu_jvp", x, "silu")
    check_like("x_t", x_t, "x", x)
    return apply_explicit(op, (x,), (x_t,))


def activation_prevalidated(x, kind: str):
    """`silu` (kind 'silu') or `gelu` (kind 'gelu' exact, 'gelu_tanh') for a caller that guarantees x is a tensor
    (the flowkern modules): dispatch only."""
    name = "flowkern.ops.silu" if kind == "silu" else "flowkern.ops.gelu"
    return apply_dual(ActivationOp(name, select_backend(name, x.device, x.dtype), kind), x)
