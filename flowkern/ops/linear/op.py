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

    def tangent_input_grads(self, inputs, tangents, aux, y_t, dy_t, needs):
        """ẏ = ẋWᵀ + xẆᵀ + ḃ is bilinear: ∂⟨ḡ, ẏ⟩/∂x = ḡẆ, ∂/∂W = ḡᵀẋ, nothing for b (the backward's GEMMs with
        Ẇ for W and ẋ for x)."""
        x, weight, bias = inputs
        x_t, w_t, _ = tangents
        k, n = weight.shape[1], weight.shape[0]
        bwd = BACKENDS[self.backend].linear_bwd
        g = dy_t.reshape(-1, n)
        dx = dw = None
        if needs[0] and w_t is not None:
            dx = bwd(x.reshape(-1, k), w_t, None, g, need_dx=True, need_dw=False, need_db=False)[0].view(x.shape)
        if needs[1] and x_t is not None:
            dw = bwd(x_t.reshape(-1, k), weight, None, g, need_dx=False, need_dw=True, need_db=False)[1]
        return dx, dw, None
