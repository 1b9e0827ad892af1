"""Pure-PyTorch attention forward (+ tangent) and backward: the reference backend and the CPU fallback.

The same online-softmax maths as the Triton kernels (see `flowkern/kernels/attention/fwd.py`), walking the keys in
chunks, so memory is O(Nq·chunk + N·D) per head, never Nq×Nk: the backward recomputes P from the saved
log-sum-exp chunk by chunk. GQA works on a [B, Hkv, G, N, D] view of the queries (no copies of k/v). Accumulates
in float32 (float64 for float64 inputs).
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
    """c·QKᵀ (+ mask) of one key chunk, [B, Hkv, G, Nq, chunk], −inf where removed."""
    s = (q @ k_chunk.transpose(-1, -2)) * spec.scale
    if mask is not None:
        m = mask[..., start:stop].unflatten(1, (spec.kv_heads, spec.kv_group))
        if spec.mask_kind == MASK_BOOL:
            s = s.masked_fill(~m, float("-inf"))
        elif spec.mask_kind == MASK_ADDITIVE:
            s = s + m.to(s.dtype)
    if spec.causal:
        rows = torch.arange(spec.seq_q, device=q.device)[:, None]
        cols = torch.arange(start, stop, device=q.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def attention_fwd(q, k, v, q_t, k_t, v_t, attn_mask, spec: AttentionSpec, *, chunk: int | None = None):
    """O, Ȯ (None without tangents) and the natural-log LSE [B, Hq, Nq] in the accumulation dtype."""
    chunk = chunk or KEY_CHUNK
    acc = accumulation_dtype(q.dtype)
    has_tangent = q_t is not None
    mask = expand_mask(attn_mask, spec)
    qg = _grouped(q, spec, acc)
    qtg = _grouped(q_t, spec, acc) if has_tangent else None
    rows = qg.shape[:-1]
    m = torch.full(rows, float("-inf"), dtype=acc, device=q.device)
    row_sum = torch.zeros(rows, dtype=acc, device=q.device)  # l = Σ p̃
    o_acc = torch.zeros(qg.shape, dtype=acc, device=q.device)
    if has_tangent:
        r = torch.zeros(rows, dtype=acc, device=q.device)
        ot_acc = torch.zeros(qg.shape, dtype=acc, device=q.device)
    for start in range(0, spec.seq_k, chunk):
        stop = min(start + chunk, spec.seq_k)
        kc, vc = _key_chunk(k, start, stop, acc), _key_chunk(v, start, stop, acc)
        s = _scores(qg, kc, mask, start, stop, spec)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(s - m_safe[..., None])
        row_sum = row_sum * alpha + p.sum(-1)
        o_acc = o_acc * alpha[..., None] + p @ vc
        if has_tangent:
            ktc, vtc = _key_chunk(k_t, start, stop, acc), _key_chunk(v_t, start, stop, acc)
            s_t = (qtg @ kc.transpose(-1, -2) + qg @ ktc.transpose(-1, -2)) * spec.scale
            p_st = p * s_t
            r = r * alpha + p_st.sum(-1)
            ot_acc = ot_acc * alpha[..., None] + p @ vtc + p_st @ vc
        m = m_new
    empty = row_sum == 0
    inv_l = torch.where(empty, 0.0, 1.0 / torch.where(empty, 1.0, row_sum))
    o = o_acc * inv_l[..., None]
    lse = torch.where(empty, float("inf"), m + torch.log(torch.where(empty, 1.0, row_sum)))
    o_t = None
    if has_tangent:
        o_t = (ot_acc * inv_l[..., None] - (r * inv_l)[..., None] * o).flatten(1, 2).to(q.dtype)
    return o.flatten(1, 2).to(q.dtype), o_t, lse.flatten(1, 2)


def attention_bwd(q, k, v, o, lse, do, attn_mask, spec: AttentionSpec, *, chunk: int | None = None):
    """dQ, dK, dV of O, recomputing P = exp(S − LSE) one key chunk at a time."""
    chunk = chunk or KEY_CHUNK
    acc = accumulation_dtype(q.dtype)
    mask = expand_mask(attn_mask, spec)
    qg, dog = _grouped(q, spec, acc), _grouped(do, spec, acc)
    lse_g = lse.unflatten(1, (spec.kv_heads, spec.kv_group)).to(acc)
    delta = (dog * _grouped(o, spec, acc)).sum(-1)  # Δ = rowsum(dO ⊙ O)
    dq = torch.zeros_like(qg)
    dks, dvs = [], []
    for start in range(0, spec.seq_k, chunk):
        stop = min(start + chunk, spec.seq_k)
        kc, vc = _key_chunk(k, start, stop, acc), _key_chunk(v, start, stop, acc)
        p = torch.exp(_scores(qg, kc, mask, start, stop, spec) - lse_g[..., None])
        dvs.append((p.transpose(-1, -2) @ dog).sum(2))
        ds = p * (dog @ vc.transpose(-1, -2) - delta[..., None])
        dq += (ds @ kc) * spec.scale
        dks.append((ds.transpose(-1, -2) @ qg).sum(2) * spec.scale)
    return (dq.flatten(1, 2).to(q.dtype), torch.cat(dks, dim=2).to(k.dtype), torch.cat(dvs, dim=2).to(v.dtype))
