"""ActivationOp: y = f(x), ẏ = f'(x)·ẋ in one pass, and the backward dx = f'(x)·dy (kernels/activations.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowkern._fused import FusedOp
from flowkern.ops._backends import BackendModules
from flowkern.ops.activations import reference

BACKENDS = BackendModules(__package__, reference)  # {"torch": reference, "triton": triton_launch}


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
        y, y_t = BACKENDS[self.backend].activation(x.contiguous(), None if x_t is None else x_t.contiguous(),
                                                   kind=self.kind)
        return y, y_t, ()

    def backward(self, inputs, aux, dy, needs):
        (x,) = inputs
        _, dx = BACKENDS[self.backend].activation(x.contiguous(), dy.contiguous(), kind=self.kind, write_y=False)
        return (dx,)

    def tangent_input_grads(self, inputs, tangents, aux, y_t, dy_t, needs):
        (x,), (x_t,) = inputs, tangents
        if x_t is None:
            return (None,)
        return (BACKENDS[self.backend].curvature(x.contiguous(), x_t.contiguous(), dy_t.contiguous(), kind=self.kind),)
