"""Pure-PyTorch forward (+ tangent) and backward of the fused ops: the reference backend and the CPU fallback.

Same signatures and the same maths as the Triton launchers (flowkern/ops/triton_launch.py; formulas in the kernel
docstrings under kernels/), computed in float32 (float64 for float64 inputs), outputs in the input dtype.
Row ops take [rows, D] tensors and [n_groups, D] parameters (flowkern/ops/_rows.py).
"""
from __future__ import annotations

import math

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(t: torch.Tensor, group: int, acc: torch.dtype) -> torch.Tensor:
    """[rows, D] -> [n_groups, group, D] in the accumulation dtype."""
    return t.to(acc).view(-1, group, t.shape[-1])


def _param(p: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """[n_groups, D] -> [n_groups, 1, D] (broadcasts over the rows of a group)."""
    return None if p is None else p.to(acc)[:, None, :]


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).to(dtype)


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
    w = _param(w, acc)
    if w is None:
        return 1.0
    return w + 1.0 if one_plus else w


def norm_fwd(x, w, b, x_t, w_t, b_t, *, is_rms: bool, one_plus: bool, group: int, eps: float):
    """y = x̂·w + b and ẏ = P(ẋ)·w + x̂·ẇ + ḃ (when x_t is not None); returns (y, y_t, mean, rstd)."""
    acc = _acc(x.dtype)
    xhat, mean, rstd = _normalize(_grouped(x, group, acc), is_rms, eps)
    w_eff = _weight(w, acc, one_plus)
    y = xhat * w_eff
    if b is not None:
        y = y + _param(b, acc)
    y_t = None
    if x_t is not None:
        y_t = _project(_grouped(x_t, group, acc), xhat, rstd, is_rms) * w_eff
        if w_t is not None:
            y_t = y_t + xhat * _param(w_t, acc)
        if b_t is not None:
            y_t = y_t + _param(b_t, acc)
        y_t = _rows(y_t, x.dtype)
    return _rows(y, x.dtype), y_t, mean.reshape(-1), rstd.reshape(-1)


def norm_bwd(x, w, dy, mean, rstd, *, is_rms: bool, one_plus: bool, group: int, need_dx: bool, need_dw: bool,
             need_db: bool):
    """dx = P(dy·w), and [n_groups, D] sums over each group of rows of dy⊙x̂ (dγ / dscale) and dy (dβ / dshift)."""
    acc = _acc(x.dtype)
    xg = _grouped(x, group, acc)
    mean = mean.view(xg.shape[:-1]).to(acc)
    rstd = rstd.view(xg.shape[:-1]).to(acc)
    xhat = (xg - mean[..., None]) * rstd[..., None]
    dyg = _grouped(dy, group, acc)
    dx = _rows(_project(dyg * _weight(w, acc, one_plus), xhat, rstd, is_rms), x.dtype) if need_dx else None
    dw = (dyg * xhat).sum(1) if need_dw else None
    db = dyg.sum(1) if need_db else None
    return dx, dw, db


def _act_and_grad(x, kind: str):
    if kind == "silu":
        sig = torch.sigmoid(x)
        return x * sig, sig * (1 + x * (1 - sig))
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
        return x * cdf, cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    c = math.sqrt(2 / math.pi)
    th = torch.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + th), 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 0.134145 * x * x)


def activation(x, v, *, kind: str, write_y: bool = True):
    """(f(x) if write_y else None, f'(x)·v if v is not None else None)."""
    acc = _acc(x.dtype)
    f, df = _act_and_grad(x.to(acc), kind)
    y = f.to(x.dtype) if write_y else None
    yv = (df * v.to(acc)).to(v.dtype) if v is not None else None
    return y, yv


def gated_residual_fwd(x, g, y, x_t, g_t, y_t, *, group: int):
    """out = x + g⊙y and ȯut = ẋ + ġ⊙y + g⊙ẏ (when x_t is not None; all three tangents given)."""
    acc = _acc(x.dtype)
    yg = _grouped(y, group, acc)
    gg = _param(g, acc)
    out = _rows(_grouped(x, group, acc) + gg * yg, x.dtype)
    out_t = None
    if x_t is not None:
        out_t = _rows(_grouped(x_t, group, acc) + _param(g_t, acc) * yg + gg * _grouped(y_t, group, acc), x.dtype)
    return out, out_t


def gated_residual_bwd(g, y, dout, *, group: int, need_dy: bool, need_dg: bool):
    """dy = g⊙dout, and the [n_groups, D] sums of dout⊙y over each group of rows (dgate)."""
    acc = _acc(y.dtype)
    doutg = _grouped(dout, group, acc)
    dy = _rows(_param(g, acc) * doutg, y.dtype) if need_dy else None
    dg = (doutg * _grouped(y, group, acc)).sum(1) if need_dg else None
    return dy, dg


def _pair(t, s, delta: bool):
    return t, (t - s if delta else s)


def time_embedding_fwd(t, s, t_t, s_t, freqs, *, dim: int, delta: bool):
    """E = [cos fτ₀, sin fτ₀, cos fτ₁, sin fτ₁] [B, 2·dim] and ė (when t_t is not None), in freqs' dtype."""
    acc = freqs.dtype
    taus = _pair(t.to(acc), s.to(acc), delta)
    args = [tau[:, None] * freqs for tau in taus]
    e = torch.cat([f(a) for a in args for f in (torch.cos, torch.sin)], dim=-1)
    e_t = None
    if t_t is not None:
        tans = _pair(t_t.to(acc), s_t.to(acc), delta)
        e_t = torch.cat([part for a, tau_t in zip(args, tans)
                         for part in (-tau_t[:, None] * freqs * torch.sin(a), tau_t[:, None] * freqs * torch.cos(a))],
                        dim=-1)
    return e, e_t


def time_embedding_bwd(t, s, freqs, de, *, dim: int, delta: bool):
    """(dt, ds) in freqs' dtype."""
    acc = freqs.dtype
    half = freqs.shape[0]
    taus = _pair(t.to(acc), s.to(acc), delta)
    de = de.to(acc)
    dtau = []
    for j, tau in enumerate(taus):
        a = tau[:, None] * freqs
        dc, ds_ = de[:, j * dim:j * dim + half], de[:, j * dim + half:(j + 1) * dim]
        dtau.append((-freqs * torch.sin(a) * dc + freqs * torch.cos(a) * ds_).sum(-1))
    if delta:
        return dtau[0] + dtau[1], -dtau[1]
    return dtau[0], dtau[1]
