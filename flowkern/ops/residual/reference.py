"""PyTorch backend of the residual family: out = x + g⊙y over [rows, D] rows, g an [n_groups, D] row parameter.

Same signatures as `flowkern.ops.residual.triton_launch` (formulas in kernels/residual.py), in the accumulation
dtype, outputs in the input dtype.
"""
from __future__ import annotations

import torch

from flowkern._precision import accumulation_dtype
from flowkern.ops._rows import flat_rows, grouped, per_group


def gated_residual_fwd(x, g, y, x_t, g_t, y_t, *, group: int):
    """out = x + g⊙y and ȯut = ẋ + ġ⊙y + g⊙ẏ (when x_t is not None; all three tangents given)."""
    acc = accumulation_dtype(x.dtype)
    yg = grouped(y, group, acc)
    gg = per_group(g, acc)
    out = flat_rows(grouped(x, group, acc) + gg * yg, x.dtype)
    out_t = None
    if x_t is not None:
        out_t = flat_rows(grouped(x_t, group, acc) + per_group(g_t, acc) * yg + gg * grouped(y_t, group, acc), x.dtype)
    return out, out_t


def gated_residual_bwd(g, y, dout, *, group: int, need_dy: bool, need_dg: bool):
    """dy = g⊙dout, and the [n_groups, D] sums of dout⊙y over each group of rows (dgate)."""
    acc = accumulation_dtype(y.dtype)
    doutg = grouped(dout, group, acc)
    dy = flat_rows(per_group(g, acc) * doutg, y.dtype) if need_dy else None
    dg = (doutg * grouped(y, group, acc)).sum(1) if need_dg else None
    return dy, dg


def native_gated_residual(x, gate, y):
    """x + gate⊙y for x, y [B, ..., D] and gate [B, D], [D] or x's shape, as native ops (a primal-only call
    that autograd differentiates)."""
    if gate.dim() == 2 and gate.shape != x.shape and x.dim() > 2:  # per sample: broadcast over the tokens
        gate = gate.view((x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],))
    return x + gate * y
