"""Gated residual `x + gate·y` (adaLN-zero), forward and tangent in one pass."""
from __future__ import annotations

from flowkern._validate import check_like
from flowkern._fused import apply_dual, apply_explicit, primal
from flowkern.ops._rows import check_tangent, param_group, row_layout, select_row_backend
from flowkern.ops.residual.op import GatedResidualOp


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


def gated_residual_prevalidated(x, gate, y):
    """`gated_residual` for a caller that guarantees what it validates (`flowkern.nn.GatedResidual`: y of x's
    shape, gate [B, D], [D] or x's shape, one dtype and device): dispatch only."""
    d = x.shape[-1]
    rows = x.numel() // d
    group = 1 if gate.shape == x.shape else (rows if gate.shape == (d,) else rows // x.shape[0])
    op = GatedResidualOp("flowkern.ops.gated_residual", select_row_backend("flowkern.ops.gated_residual", x, d),
                         group)
    return apply_dual(op, x, gate, y)


def gated_residual_jvp(x, gate, y, x_t, gate_t=None, y_t=None):
    """(out, ȯut) of `gated_residual` from one fused pass; missing tangents are zero. ȯut is differentiable (reverse over forward)."""
    op = _op("flowkern.ops.gated_residual_jvp", x, gate, y)
    if x_t is None:
        raise TypeError("x_t must be a torch.Tensor, got None")
    for name, t, ref_name, ref in (("x_t", x_t, "x", x), ("gate_t", gate_t, "gate", gate), ("y_t", y_t, "y", y)):
        check_tangent(name, t, ref_name, ref)
    return apply_explicit(op, (x, gate, y), (x_t, gate_t, y_t))


__all__ = ["gated_residual", "gated_residual_jvp"]
