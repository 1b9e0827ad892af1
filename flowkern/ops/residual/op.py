"""GatedResidualOp: out = x + g⊙y with its tangent in one pass, and its backward (kernels/residual.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowkern._fused import FusedOp, zeros_if_none
from flowkern.ops._rows import as_rows
from flowkern.ops._backends import BackendModules
from flowkern.ops.residual import reference

BACKENDS = BackendModules(__package__, reference)  # {"torch": reference, "triton": triton_launch}


@dataclass(frozen=True)
class GatedResidualOp(FusedOp):
    """out = x + g⊙y; inputs (x, g, y), g as a row parameter (flowkern/ops/_rows.py)."""

    name: str
    backend: str
    group: int
    n_inputs: ClassVar[int] = 3

    def forward(self, inputs, tangents):
        x, g, y = inputs
        d = x.shape[-1]
        x_t = g_t = y_t = None
        if tangents is not None:
            x_t, g_t, y_t = (zeros_if_none(t, p) for t, p in zip(tangents, inputs))
        out, out_t = BACKENDS[self.backend].gated_residual_fwd(
            as_rows(x, d), as_rows(g, d), as_rows(y, d), as_rows(x_t, d), as_rows(g_t, d), as_rows(y_t, d),
            group=self.group)
        return out.view(x.shape), (None if out_t is None else out_t.view(x.shape)), ()

    def backward(self, inputs, aux, dout, needs):
        x, g, y = inputs
        d = x.shape[-1]
        dy, dg = BACKENDS[self.backend].gated_residual_bwd(
            as_rows(g, d), as_rows(y, d), as_rows(dout, d), group=self.group, need_dy=needs[2], need_dg=needs[1])
        dg = None if dg is None else dg.reshape(g.shape).to(g.dtype)
        return dout, dg, (None if dy is None else dy.view(y.shape))

    def tangent_input_grads(self, inputs, tangents, aux, y_t, dy_t, needs):
        """ȯut = ẋ + ġ⊙y + g⊙ẏ is bilinear: ∂⟨ḡ, ȯut⟩/∂g = Σ ḡ⊙ẏ, ∂/∂y = ġ⊙ḡ, nothing for x (the backward's own
        kernels with ẏ for y and ġ for g)."""
        x, g, y = inputs
        _, g_t, y_t_in = tangents
        d = x.shape[-1]
        bwd = BACKENDS[self.backend].gated_residual_bwd
        dg = dy = None
        if needs[1] and y_t_in is not None:
            dg = bwd(as_rows(g, d), as_rows(y_t_in, d), as_rows(dy_t, d), group=self.group, need_dy=False,
                     need_dg=True)[1].reshape(g.shape).to(g.dtype)
        if needs[2] and g_t is not None:
            dy = bwd(as_rows(g_t, d), as_rows(y, d), as_rows(dy_t, d), group=self.group, need_dy=True,
                     need_dg=False)[0].view(y.shape)
        return None, dg, dy
