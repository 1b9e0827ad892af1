"""Gated residual `x + gate·y` (adaLN-zero), forward and tangent in one pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowkern._validate import check_like
from flowkern._fused import FusedOp, apply_dual, apply_explicit, launcher, primal, zeros_if_none
from flowkern.ops._rows import as_rows, check_tangent, param_group, row_layout, select_row_backend


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
        out, out_t = launcher(self.backend).gated_residual_fwd(
            as_rows(x, d), as_rows(g, d), as_rows(y, d), as_rows(x_t, d), as_rows(g_t, d), as_rows(y_t, d),
            group=self.group)
        return out.view(x.shape), (None if out_t is None else out_t.view(x.shape)), ()

    def backward(self, inputs, aux, dout, needs):
        x, g, y = inputs
        d = x.shape[-1]
        dy, dg = launcher(self.backend).gated_residual_bwd(
            as_rows(g, d), as_rows(y, d), as_rows(dout, d), group=self.group, need_dy=needs[2], need_dg=needs[1])
        dg = None if dg is None else dg.reshape(g.shape).to(g.dtype)
        return dout, dg, (None if dy is None else dy.view(y.shape))


def _op(name, x, gate, y) -> GatedResidualOp:
    layout = row_layout("x", x)
    check_like("y", y, "x", x)
    group = param_group("gate", gate, "x", x, shared_ok=True, per_sample_ok=True)
    backend = select_row_backend(name, x, layout.n_cols)
    return GatedResidualOp(name, backend, group)


def gated_residual(x, gate, y):
    """x + gate·y (the adaLN-zero residual), with a fused forward-mode rule: ẋ + ġ·y + gate·ẏ.

    x, y: [B, ..., D] of one dtype; gate: [B, D] (per sample, broadcast over the tokens), [D], or the shape of x.
    Differentiable w.r.t. all three; under forward AD the tangent comes from the same kernel pass.

    Example:
        >>> x = flowkern.ops.gated_residual(x, gate_msa, attn_out)      # x [B, N, D], gate [B, D]
    """
    op = _op("flowkern.ops.gated_residual", primal(x), primal(gate), primal(y))
    return apply_dual(op, x, gate, y)


def gated_residual_jvp(x, gate, y, x_t, gate_t=None, y_t=None):
    """(out, ȯut) of `gated_residual` from one fused pass; missing tangents are zero. ȯut is stop-gradient."""
    op = _op("flowkern.ops.gated_residual_jvp", x, gate, y)
    if x_t is None:
        raise TypeError("x_t must be a torch.Tensor, got None")
    for name, t, ref_name, ref in (("x_t", x_t, "x", x), ("gate_t", gate_t, "gate", gate), ("y_t", y_t, "y", y)):
        check_tangent(name, t, ref_name, ref)
    return apply_explicit(op, (x, gate, y), (x_t, gate_t, y_t))


__all__ = ["gated_residual", "gated_residual_jvp"]
