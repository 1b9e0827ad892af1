"""GELU (exact and tanh) and SiLU with a fused forward-mode rule: y = f(x), ẏ = f'(x)·ẋ in one pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowkern._dispatch import select_backend
from flowkern._validate import check_like, check_tensor
from flowkern._fused import FusedOp, apply_dual, apply_explicit, launcher, primal

APPROXIMATIONS = ("none", "tanh")


@dataclass(frozen=True)
class ActivationOp(FusedOp):
    """y = f(x) elementwise, f in 'silu', 'gelu' (exact), 'gelu_tanh'."""

    name: str
    backend: str
    kind: str
    n_inputs: ClassVar[int] = 1

    def forward(self, inputs, tangents):
        (x,) = inputs
        x_t = None if tangents is None else tangents[0]  # not None when tangents is: x is the only input
        y, y_t = launcher(self.backend).activation(x.contiguous(), None if x_t is None else x_t.contiguous(),
                                                   kind=self.kind)
        return y, y_t, ()

    def backward(self, inputs, aux, dy, needs):
        (x,) = inputs
        _, dx = launcher(self.backend).activation(x.contiguous(), dy.contiguous(), kind=self.kind, write_y=False)
        return (dx,)


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
    """(gelu(x), gelu'(x)·x_t) from one pass. The tangent is stop-gradient."""
    op = _op("flowkern.ops.gelu_jvp", x, _gelu_kind(approximate))
    check_like("x_t", x_t, "x", x)
    return apply_explicit(op, (x,), (x_t,))


def silu(x):
    """`F.silu(x)` with a fused forward-mode rule: f = x·σ(x), f' = σ(x)(1 + x(1 − σ(x))). Shapes as `gelu`."""
    return apply_dual(_op("flowkern.ops.silu", primal(x), "silu"), x)


def silu_jvp(x, x_t):
    """(silu(x), silu'(x)·x_t) from one pass. The tangent is stop-gradient."""
    op = _op("flowkern.ops.silu_jvp", x, "silu")
    check_like("x_t", x_t, "x", x)
    return apply_explicit(op, (x,), (x_t,))
