"""NormOp: y = x̂·w + b over the last dim (LayerNorm, RMSNorm, adaLN modulate) on plain tensors: forward
with its tangent in one pass, backward; maths in kernels/norms.py and `flowkern.ops.norms.reference`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowkern._fused import FusedOp, zeros_if_none
from flowkern.ops._rows import as_rows
from flowkern.ops._backends import BackendModules
from flowkern.ops.norms import reference

BACKENDS = BackendModules(__package__, reference)  # {"torch": reference, "triton": triton_launch}


@dataclass(frozen=True)
class NormOp(FusedOp):
    """y = x̂·w + b over the last dim; inputs (x, w, b), w = γ or adaLN scale (ONE_PLUS: w_eff = 1 + scale)."""

    name: str
    backend: str
    is_rms: bool
    one_plus: bool
    eps: float
    group: int  # rows of x per row of w and b (flowkern/ops/_rows.py); w and b share one layout
    n_inputs: ClassVar[int] = 3

    def forward(self, inputs, tangents):
        x, w, b = inputs
        d = x.shape[-1]
        x_t = w_t = b_t = None
        if tangents is not None:
            x_t, w_t, b_t = tangents
            x_t = zeros_if_none(x_t, x)
        y, y_t, mean, rstd = BACKENDS[self.backend].norm_fwd(
            as_rows(x, d), as_rows(w, d), as_rows(b, d), as_rows(x_t, d), as_rows(w_t, d), as_rows(b_t, d),
            is_rms=self.is_rms, one_plus=self.one_plus, group=self.group, eps=self.eps)
        return y.view(x.shape), (None if y_t is None else y_t.view(x.shape)), (mean, rstd)

    def backward(self, inputs, aux, dy, needs):
        x, w, b = inputs
        mean, rstd = aux
        d = x.shape[-1]
        dx, dw, db = BACKENDS[self.backend].norm_bwd(
            as_rows(x, d), as_rows(w, d), as_rows(dy, d), mean, rstd, is_rms=self.is_rms, one_plus=self.one_plus,
            group=self.group, need_dx=needs[0], need_dw=needs[1], need_db=needs[2])
        dw = None if dw is None else dw.reshape(w.shape).to(w.dtype)
        db = None if db is None else db.reshape(b.shape).to(b.dtype)
        return (None if dx is None else dx.view(x.shape)), dw, db

    def tangent_input_grads(self, inputs, tangents, aux, y_t, dy_t, needs):
        x, w, b = inputs
        x_t, w_t, _ = tangents
        mean, rstd = aux
        if x_t is None and w_t is None:
            return None, None, None
        d = x.shape[-1]
        x_t = x_t if x_t is not None else x.new_zeros(x.shape)
        dx, dw = BACKENDS[self.backend].norm_tangent_input_grads(
            as_rows(x, d), as_rows(w, d), as_rows(x_t, d), as_rows(w_t, d), as_rows(dy_t, d), mean, rstd,
            is_rms=self.is_rms, one_plus=self.one_plus, group=self.group, need_dx=needs[0],
            need_dw=needs[1] and w is not None)
        dw = None if dw is None else dw.reshape(w.shape).to(w.dtype)
        return (None if dx is None else dx.view(x.shape)), dw, None
