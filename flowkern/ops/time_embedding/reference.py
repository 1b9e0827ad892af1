"""PyTorch backend of the time_embedding family: E = [cos fτ₀, sin fτ₀, cos fτ₁, sin fτ₁] and its tangent / gradient.

Same signatures as `flowkern.ops.time_embedding.triton_launch` (formulas in kernels/time_embedding.py), computed in
the dtype of the frequency table (float32, or float64 for float64 times).
"""
from __future__ import annotations

import torch


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
