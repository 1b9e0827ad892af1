"""PyTorch backend of the norms family: forward (+ tangent) and backward of y = x̂·w + b over [rows, D] rows.

Same signatures and maths as `flowkern.ops.norms.triton_launch` (formulas in kernels/norms.py), computed in the
accumulation dtype (`flowkern._precision.accumulation_dtype`), outputs in the input dtype. Parameters are
[n_groups, D] (flowkern/ops/_rows.py). A primal-only call (no tangent) where x already is in the accumulation
dtype uses `torch.native_layer_norm`, so autograd differentiates one native op instead of a composite.
"""
from __future__ import annotations

import torch

from flowkern._precision import accumulation_dtype
from flowkern.ops._rows import flat_rows, grouped, per_group


def _normalize(xg, is_rms: bool, eps: float):
    mean = torch.zeros(xg.shape[:-1], dtype=xg.dtype, device=xg.device) if is_rms else xg.mean(-1)
    xc = xg - mean[..., None]
    rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
    return xc * rstd[..., None], mean, rstd


def _project(v, xhat, rstd, is_rms: bool):
    """r·(v − mean(v) − x̂·mean(x̂⊙v)) (no mean(v) for RMSNorm)."""
    out = v - xhat * (xhat * v).mean(-1, keepdim=True)
    if not is_rms:
        out = out - v.mean(-1, keepdim=True)
    return out * rstd[..., None]


def _weight(w, acc, one_plus: bool):
    w = per_group(w, acc)
    if w is None:
        return 1.0
    return w + 1.0 if one_plus else w


def norm_fwd(x, w, b, x_t, w_t, b_t, *, is_rms: bool, one_plus: bool, group: int, eps: float):
    """y = x̂·w + b and ẏ = P(ẋ)·w + x̂·ẇ + ḃ (when x_t is not None); returns (y, y_t, mean, rstd)."""
    acc = accumulation_dtype(x.dtype)
    if x_t is None and not is_rms and x.dtype == acc:
        return _native_layer_norm(x, w, b, one_plus=one_plus, group=group, eps=eps)
    xhat, mean, rstd = _normalize(grouped(x, group, acc), is_rms, eps)
    w_eff = _weight(w, acc, one_plus)
    y = xhat * w_eff
    if b is not None:
        y = y + per_group(b, acc)
    y_t = None
    if x_t is not None:
        y_t = _project(grouped(x_t, group, acc), xhat, rstd, is_rms) * w_eff
        if w_t is not None:
            y_t = y_t + xhat * per_group(w_t, acc)
        if b_t is not None:
            y_t = y_t + per_group(b_t, acc)
        y_t = flat_rows(y_t, x.dtype)
    return flat_rows(y, x.dtype), y_t, mean.reshape(-1), rstd.reshape(-1)


def norm_bwd(x, w, dy, mean, rstd, *, is_rms: bool, one_plus: bool, group: int, need_dx: bool, need_dw: bool,
             need_db: bool):
    """dx = P(dy·w), and [n_groups, D] sums over each group of rows of dy⊙x̂ (dγ / dscale) and dy (dβ / dshift)."""
    acc = accumulation_dtype(x.dtype)
    xg = grouped(x, group, acc)
    mean = mean.view(xg.shape[:-1]).to(acc)
    rstd = rstd.view(xg.shape[:-1]).to(acc)
    xhat = (xg - mean[..., None]) * rstd[..., None]
    dyg = grouped(dy, group, acc)
    dx = flat_rows(_project(dyg * _weight(w, acc, one_plus), xhat, rstd, is_rms), x.dtype) if need_dx else None
    dw = (dyg * xhat).sum(1) if need_dw else None
    db = dyg.sum(1) if need_db else None
    return dx, dw, db


def _native_layer_norm(x, w, b, *, one_plus: bool, group: int, eps: float):
    """`norm_fwd` without a tangent for x in its accumulation dtype: one `torch.native_layer_norm` (γ, β fused
    when shared by every row), the per-group modulation applied after it."""
    rows, d = x.shape
    shared = group == rows and not one_plus
    y, mean, rstd = torch.native_layer_norm(x, (d,), w.view(d) if shared and w is not None else None,
                                            b.view(d) if shared and b is not None else None, eps)
    if not shared:
        yg = y.view(-1, group, d)
        if w is not None:
            yg = yg * _weight(w, x.dtype, one_plus)
        if b is not None:
            yg = yg + b[:, None, :]
        y = yg.view(rows, d)
    return y, None, mean.view(-1), rstd.view(-1)



def native_modulate(x, shift, scale, *, is_rms: bool, eps: float):
    """z = norm(x)·(1 + scale) + shift for x [B, ..., D] with shift, scale [B, D] or x's shape, as native ops (a
    primal-only call that autograd differentiates; x in its accumulation dtype)."""
    d = x.shape[-1]
    if shift.shape != x.shape:  # per sample: broadcast over the tokens
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (d,)
        shift, scale = shift.view(shape), scale.view(shape)
    xhat = torch.rms_norm(x, (d,), None, eps) if is_rms else torch.layer_norm(x, (d,), None, None, eps)
    return xhat * (1 + scale) + shift


def norm_tangent_input_grads(x, w, x_t, w_t, dy_t, mean, rstd, *, is_rms: bool, one_plus: bool, group: int,
                             need_dx: bool, need_dw: bool):
    """The mixed term of reverse over forward (kernels/norms.py): for ḡ = dy_t and a = ḡ·w,
    dx = −r·(x̂·mean(a⊙P(ẋ)) + P(a·mean(x̂⊙ẋ) + ẋ·mean(a⊙x̂))) + P(ḡ⊙ẇ), and the [n_groups, D] sums of ḡ⊙P(ẋ)
    (dγ / dscale)."""
    acc = accumulation_dtype(x.dtype)
    xg = grouped(x, group, acc)
    mean = mean.view(xg.shape[:-1]).to(acc)
    rstd = rstd.view(xg.shape[:-1]).to(acc)
    xhat = (xg - mean[..., None]) * rstd[..., None]
    g = grouped(dy_t, group, acc)
    v = grouped(x_t, group, acc)
    p_v = _project(v, xhat, rstd, is_rms)
    dx = None
    if need_dx:
        a = g * _weight(w, acc, one_plus)
        inner = a * (xhat * v).mean(-1, keepdim=True) + v * (a * xhat).mean(-1, keepdim=True)
        dx = -rstd[..., None] * (xhat * (a * p_v).mean(-1, keepdim=True) + _project(inner, xhat, rstd, is_rms))
        if w_t is not None:
            dx = dx + _project(g * per_group(w_t, acc), xhat, rstd, is_rms)
        dx = flat_rows(dx, x.dtype)
    dw = (g * p_v).sum(1) if need_dw else None
    return dx, dw
