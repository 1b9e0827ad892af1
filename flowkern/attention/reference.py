"""Pure-PyTorch attention forward (+ tangent) and backward: the reference backend and the CPU fallback.

The same online-softmax maths as the Triton kernels (see `flowkern/kernels/attention/fwd.py`: natural-unit scores,
the centred tangent sum, the row statistics (m, 1/l)), walking the keys in chunks, so memory is
O(Nq·chunk + N·D) per head, never Nq×Nk: the backward recomputes P from the saved statistics chunk by chunk. GQA
works on a [B, Hkv, G, N, D] view of the queries (no copies of k/v). Accumulates in float32 (float64 for float64
inputs), with autocast off (its matmuls would otherwise run in the autocast dtype).
"""
from __future__ import annotations

import torch

from flowkern._precision import accumulation_dtype
from flowkern.attention.spec import MASK_ADDITIVE, MASK_BOOL, AttentionSpec, expand_mask

KEY_CHUNK = 128


def _grouped(x: torch.Tensor, spec: AttentionSpec, dtype: torch.dtype) -> torch.Tensor:
    """[B, Hq, N, D] -> [B, Hkv, G, N, D] in the accumulation dtype."""
    return x.unflatten(1, (spec.kv_heads, spec.kv_group)).to(dtype)


def _key_chunk(x: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, Hkv, Nk, D] -> [B, Hkv, 1, chunk, D]."""
    return x[:, :, None, start:stop].to(dtype)


def _scores(q, k_chunk, mask, start: int, stop: int, spec: AttentionSpec) -> torch.Tensor:
    """c·QKᵀ (+ mask) of one key chunk, [B, Hkv, G, Nq, chunk]; a removed score is s − ∞ (as in the kernels)."""
    s = (q @ k_chunk.transpose(-1, -2)) * spec.scale
    keep = None
    if mask is not None:
        m = mask[..., start:stop].unflatten(1, (spec.kv_heads, spec.kv_group))
        if spec.mask_kind == MASK_BOOL:
            keep = m
        elif spec.mask_kind == MASK_ADDITIVE:
            s = s + m.to(s.dtype)
    if spec.is_causal:
        rows = torch.arange(spec.seq_q, device=q.device)[:, None]
        cols = torch.arange(start, stop, device=q.device)[None, :]
        causal_keep = cols <= rows + spec.causal_offset
        keep = causal_keep if keep is None else keep & causal_keep
    return s if keep is None else torch.where(keep, s, s - float("inf"))


def _p_chunk(s: torch.Tensor, row_max: torch.Tensor, inv_l: torch.Tensor) -> torch.Tensor:
    """P = exp(S − m)·(1/l): S − m first, so a huge |m| loses nothing of l."""
    return torch.exp(s - row_max[..., None]) * inv_l[..., None]


def attention_fwd(q, k, v, q_t, k_t, v_t, attn_mask, spec: AttentionSpec, *, chunk: int | None = None):
    """O, Ȯ (None without tangents) and the row statistics [B, Hq, Nq, 2] = (m, 1/l) in the accumulation dtype."""
    with torch.autocast(q.device.type, enabled=False):
        return _fwd(q, k, v, q_t, k_t, v_t, attn_mask, spec, chunk or KEY_CHUNK)


def _fwd(q, k, v, q_t, k_t, v_t, attn_mask, spec: AttentionSpec, chunk: int):
    acc = accumulation_dtype(q.dtype)
    has_tangent = q_t is not None
    mask = expand_mask(attn_mask, spec)
    qg = _grouped(q, spec, acc)
    qtg = _grouped(q_t, spec, acc) if has_tangent else None
    rows = qg.shape[:-1]
    out_shape = (*rows, spec.head_dim_v)
    m = torch.full(rows, float("-inf"), dtype=acc, device=q.device)
    row_sum = torch.zeros(rows, dtype=acc, device=q.device)  # l = Σ p̃
    o_acc = torch.zeros(out_shape, dtype=acc, device=q.device)
    if has_tangent:
        mu = torch.zeros(rows, dtype=acc, device=q.device)  # μ̂, the running estimate of μ
        ot_acc = torch.zeros(out_shape, dtype=acc, device=q.device)  # T̃ = Σ p̃V̇ + p̃(Ṡ − μ̂)V
    for start in range(0, spec.seq_k, chunk):
        stop = min(start + chunk, spec.seq_k)
        kc, vc = _key_chunk(k, start, stop, acc), _key_chunk(v, start, stop, acc)
        s = _scores(qg, kc, mask, start, stop, spec)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(s - m_safe[..., None])
        l_old = row_sum * alpha
        row_sum = l_old + p.sum(-1)
        o_acc = o_acc * alpha[..., None]
        if has_tangent:
            ktc, vtc = _key_chunk(k_t, start, stop, acc), _key_chunk(v_t, start, stop, acc)
            s_t = (qtg @ kc.transpose(-1, -2) + qg @ ktc.transpose(-1, -2)) * spec.scale
            seen = row_sum > 0
            mu_new = torch.where(seen, (l_old * mu + (p * s_t).sum(-1)) / torch.where(seen, row_sum, 1.0), mu)
            ot_acc = ot_acc * alpha[..., None] - (mu_new - mu)[..., None] * o_acc
            ot_acc = ot_acc + p @ vtc + (p * (s_t - mu_new[..., None])) @ vc
            mu = mu_new
        o_acc = o_acc + p @ vc
        m = m_new
    empty = row_sum == 0
    inv_l = torch.where(empty, 0.0, 1.0 / torch.where(empty, 1.0, row_sum))
    stats = torch.stack([torch.where(empty, float("inf"), m), inv_l], dim=-1)
    o_t = (ot_acc * inv_l[..., None]).flatten(1, 2).to(q.dtype) if has_tangent else None
    return (o_acc * inv_l[..., None]).flatten(1, 2).to(q.dtype), o_t, stats.flatten(1, 2)


def attention_bwd(q, k, v, o, stats, do, attn_mask, spec: AttentionSpec, *, chunk: int | None = None):
    """dQ, dK, dV of O, recomputing P = exp(S − m)·(1/l) one key chunk at a time: a first walk for
    Δ = Σⱼ P dP, a second for the gradients."""
    with torch.autocast(q.device.type, enabled=False):
        return _bwd(q, k, v, o, stats, do, attn_mask, spec, chunk or KEY_CHUNK)


def _bwd(q, k, v, o, stats, do, attn_mask, spec: AttentionSpec, chunk: int):
    acc = accumulation_dtype(q.dtype)
    mask = expand_mask(attn_mask, spec)
    qg, dog = _grouped(q, spec, acc), _grouped(do, spec, acc)
    stats_g = stats.unflatten(1, (spec.kv_heads, spec.kv_group)).to(acc)
    row_max, inv_l = stats_g[..., 0], stats_g[..., 1]
    delta = torch.zeros(qg.shape[:-1], dtype=acc, device=q.device)  # Δ = Σⱼ P dP (see kernels/attention/bwd.py)
    for start in range(0, spec.seq_k, chunk):
        stop = min(start + chunk, spec.seq_k)
        kc, vc = _key_chunk(k, start, stop, acc), _key_chunk(v, start, stop, acc)
        p = _p_chunk(_scores(qg, kc, mask, start, stop, spec), row_max, inv_l)
        delta += (p * (dog @ vc.transpose(-1, -2))).sum(-1)
    dq = torch.zeros_like(qg)
    dks, dvs = [], []
    for start in range(0, spec.seq_k, chunk):
        stop = min(start + chunk, spec.seq_k)
        kc, vc = _key_chunk(k, start, stop, acc), _key_chunk(v, start, stop, acc)
        p = _p_chunk(_scores(qg, kc, mask, start, stop, spec), row_max, inv_l)
        dvs.append((p.transpose(-1, -2) @ dog).sum(2))
        ds = p * (dog @ vc.transpose(-1, -2) - delta[..., None])
        dq += (ds @ kc) * spec.scale
        dks.append((ds.transpose(-1, -2) @ qg).sum(2) * spec.scale)
    return (dq.flatten(1, 2).to(q.dtype), torch.cat(dks, dim=2).to(k.dtype), torch.cat(dvs, dim=2).to(v.dtype))
