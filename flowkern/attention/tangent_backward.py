"""Reverse over forward through attention: the gradients of (O, Ȯ) with respect to q, k, v and q̇, k̇, v̇, in PyTorch,
walking the keys in chunks (memory O(N·D + Nq·chunk) per head, never Nq×Nk). The CPU backend and the oracle of
kernels/attention/tangent_bwd.py (which holds the derivation; docs/attention.md).

Per row i, with P = exp(S − LSE), Ṡ = c·(Q̇Kᵀ + QK̇ᵀ), μ = Σⱼ P⊙Ṡ, cotangents G of O (may be absent) and Ḡ of Ȯ:
    δ̄ = Ḡ·O,  κ = Ḡ·Ȯ + G·O                                 (row statistics, from saved outputs)
    dṠ = P⊙(ḠVᵀ − δ̄),  dS = Ṡ⊙dṠ + P⊙(ḠV̇ᵀ + GVᵀ − κ) − μ⊙dṠ
    dQ = c·(dS K + dṠ K̇),  dK = c·(dSᵀQ + dṠᵀQ̇),  dV = PᵀG + (P⊙(Ṡ − μ))ᵀḠ
    dQ̇ = c·dṠ K,           dK̇ = c·dṠᵀQ,            dV̇ = PᵀḠ
μ is not saved by the forward: a first pass over the key chunks recomputes it (three products per chunk).
"""
from __future__ import annotations

import torch

from flowkern._precision import accumulation_dtype
from flowkern.attention.reference import KEY_CHUNK, _grouped, _key_chunk, _p_chunk, _scores
from flowkern.attention.spec import AttentionSpec, expand_mask


def _tangent_scores(q, q_t, k_chunk, kt_chunk, spec: AttentionSpec):
    """Ṡ = c·(Q̇Kᵀ + QK̇ᵀ) of one key chunk, [B, Hkv, G, Nq, chunk]."""
    return (q_t @ k_chunk.transpose(-1, -2) + q @ kt_chunk.transpose(-1, -2)) * spec.scale


def attention_tangent_bwd(q, k, v, q_t, k_t, v_t, o, o_t, stats, do, do_t, attn_mask, spec: AttentionSpec, *,
                          chunk: int | None = None):
    """(dQ, dK, dV, dQ̇, dK̇, dV̇) for cotangents do of O (None: only Ȯ is differentiated) and do_t of Ȯ; `stats` the
    forward's row statistics [B, Hq, Nq, 2] (row max m, 1/l), so P = exp(S − m)/l exactly as the forward had it."""
    chunk = chunk or KEY_CHUNK
    acc = accumulation_dtype(q.dtype)
    mask = expand_mask(attn_mask, spec)
    qg, qtg, dotg = (_grouped(x, spec, acc) for x in (q, q_t, do_t))
    dog = None if do is None else _grouped(do, spec, acc)
    og = _grouped(o, spec, acc)
    stats_g = stats.unflatten(1, (spec.kv_heads, spec.kv_group)).to(acc)
    row_max, inv_l = stats_g[..., 0], stats_g[..., 1]
    delta_t = (dotg * og).sum(-1)[..., None]  # δ̄ = Ḡ·O
    kappa = (dotg * _grouped(o_t, spec, acc)).sum(-1)  # κ = Ḡ·Ȯ + G·O
    if dog is not None:
        kappa = kappa + (dog * og).sum(-1)
    kappa = kappa[..., None]

    def chunk_terms(start, stop):
        kc, vc, ktc, vtc = (_key_chunk(x, start, stop, acc) for x in (k, v, k_t, v_t))
        p = _p_chunk(_scores(qg, kc, mask, start, stop, spec), row_max, inv_l)
        return kc, vc, ktc, vtc, p, _tangent_scores(qg, qtg, kc, ktc, spec)

    mu = torch.zeros((*row_max.shape, 1), dtype=acc, device=q.device)
    for start in range(0, spec.seq_k, chunk):
        *_, p, s_t = chunk_terms(start, min(start + chunk, spec.seq_k))
        mu += (p * s_t).sum(-1, keepdim=True)

    dq = torch.zeros_like(qg)
    dqt = torch.zeros_like(qg)
    grads_kv = []  # per chunk: dK, dV, dK̇, dV̇ summed over the query heads of each GQA group
    for start in range(0, spec.seq_k, chunk):
        stop = min(start + chunk, spec.seq_k)
        kc, vc, ktc, vtc, p, s_t = chunk_terms(start, stop)
        ds_t = p * (dotg @ vc.transpose(-1, -2) - delta_t)  # dṠ
        inner = dotg @ vtc.transpose(-1, -2) - kappa
        if dog is not None:
            inner = inner + dog @ vc.transpose(-1, -2)
        ds = (s_t - mu) * ds_t + p * inner  # dS
        dq += (ds @ kc + ds_t @ ktc) * spec.scale
        dqt += (ds_t @ kc) * spec.scale
        dv = ((p * (s_t - mu)).transpose(-1, -2) @ dotg)
        if dog is not None:
            dv = dv + p.transpose(-1, -2) @ dog
        grads_kv.append(((ds.transpose(-1, -2) @ qg + ds_t.transpose(-1, -2) @ qtg).sum(2) * spec.scale,
                         dv.sum(2), (ds_t.transpose(-1, -2) @ qg).sum(2) * spec.scale,
                         (p.transpose(-1, -2) @ dotg).sum(2)))
    dk, dv, dkt, dvt = (torch.cat(parts, dim=2) for parts in zip(*grads_kv))
    return (dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dqt.flatten(1, 2).to(q.dtype),
            dkt.to(k.dtype), dvt.to(v.dtype))
