"""LinearOp: y = xWᵀ + b with ẏ from the same GEMM over [x; ẋ], and its backward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowkern._fused import FusedOp
from flowkern.ops._backends import BackendModules
from flowkern.ops.linear import reference

BACKENDS = BackendModules(__package__, reference)  # {"torch": reference, "triton": triton_launch}


@dataclass(frozen=True)
class LinearOp(FusedOp):
    """y = xWᵀ + b over the last dim; inputs (x, weight, bias)."""

    name: str
    backend: str
    n_inputs: ClassVar[int] = 3

    def forward(self, inputs, tangents):
        x, weight, bias = inputs
        k, n = weight.shape[1], weight.shape[0]
        x_t = w_t = b_t = None
        if tangents is not None:
            x_t, w_t, b_t = tangents
        y, y_t = BACKENDS[self.backend].linear_fwd(x.reshape(-1, k), weight, bias,
                                                   None if x_t is None else x_t.reshape(-1, k), w_t, b_t,
                                                   tangent=tangents is not None)
        shape = (*x.shape[:-1], n)
        return y.view(shape), (None if y_t is None else y_t.view(shape)), ()

    def backward(self, inputs, aux, dy, needs):
        x, weight, bias = inputs
        k, n = weight.shape[1], weight.shape[0]
        dx, dw, db = BACKENDS[self.backend].linear_bwd(x.reshape(-1, k), weight, bias, dy.reshape(-1, n),
                                                       need_dx=needs[0], need_dw=needs[1], need_db=needs[2])
        return (None if dx is None else dx.view(x.shape)), dw, db
