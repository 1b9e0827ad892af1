"""Host launcher of the attention tangent backward (kernels/attention/tangent_bwd.py): allocate, grid, launch. Same
signature as `flowkern.attention.tangent_backward.attention_tangent_bwd` (the PyTorch backend)."""
from __future__ import annotations

import torch
import triton

from flowkern._fused import kernel_module
from flowkern.attention.spec import AttentionSpec
from flowkern.attention.triton_launch import _block_d, _mask_args, _padded, _tile_loads, _walk_flags


def attention_tangent_bwd(q, k, v, q_t, k_t, v_t, o, o_t, stats, do, do_t, attn_mask, spec: AttentionSpec):
    """(dQ, dK, dV, dQ̇, dK̇, dV̇) for cotangents do of O (None: only Ȯ is differentiated) and do_t of Ȯ; `stats` the
    forward's row statistics [B, Hq, Nq, 2] (m, 1/l). Ev ≠ E runs zero-padded to max(E, Ev), as the forward."""
    kern = kernel_module("attention.configs")
    e, ev, width = spec.head_dim, spec.head_dim_v, spec.padded_head_dim
    q, k, q_t, k_t = (_padded(x, width) for x in (q, k, q_t, k_t))
    v, v_t, o, o_t, do, do_t = (_padded(x, width) for x in (v, v_t, o, o_t, do, do_t))
    block_d = _block_d(width)
    has_do = do is not None
    do_ = do if has_do else do_t  # a pointer the kernels do not read without HAS_DO
    rows = (spec.batch, spec.q_heads, spec.seq_q)
    delta_t, kappa, mu = (torch.empty(rows, dtype=torch.float32, device=q.device) for _ in range(3))
    bh = spec.batch * spec.q_heads
    kern.tangent_bwd_rows[(triton.cdiv(spec.seq_q, kern.DELTA_BLOCK_M), bh)](
        o, o_t, do_, do_t, delta_t, kappa, *o.stride(), *o_t.stride(), *do_.stride(), *do_t.stride(),
        spec.q_heads, spec.seq_q, width, HAS_DO=has_do, BLOCK_M=kern.DELTA_BLOCK_M, BLOCK_D=block_d,
    )
    dq, dqt = torch.empty_like(q), torch.empty_like(q)
    dk, dkt = torch.empty_like(k), torch.empty_like(k)
    dv, dvt = torch.empty_like(v), torch.empty_like(v)
    mask, mask_strides = _mask_args(attn_mask, spec, q)
    strides = (*q.stride(), *k.stride(), *v.stride(), *q_t.stride(), *k_t.stride(), *v_t.stride(), *do_.stride(),
               *do_t.stride(), *mask_strides)
    common = dict(HAS_DO=has_do, CAUSAL=spec.is_causal, MASK_KIND=spec.mask_kind, BLOCK_D=block_d)
    inputs = (q, k, v, q_t, k_t, v_t, do_, do_t, stats, delta_t, kappa, mu, mask)
    # dQ first: it writes μ, which the dK/dV pass reads
    with _tile_loads(q.device, k, v, k_t, v_t) as tma:
        kern.tangent_bwd_dq[lambda meta: (triton.cdiv(spec.seq_q, meta["BLOCK_M"]), bh)](
            *inputs, dq, dqt, *strides, *dq.stride(), *dqt.stride(),
            spec.q_heads, spec.kv_group, spec.seq_q, spec.seq_k, width, spec.scale, spec.causal_offset,
            **common, **_walk_flags(q.dtype, "tangent_bwd_dq", width, tma),
        )
    with _tile_loads(q.device, q, q_t, do, do_t) as tma:
        kern.tangent_bwd_dkdv[lambda meta: (triton.cdiv(spec.seq_k, meta["BLOCK_N"]), spec.batch * spec.kv_heads)](
            *inputs, dk, dv, dkt, dvt, *strides, *dk.stride(), *dv.stride(), *dkt.stride(), *dvt.stride(),
            spec.q_heads, spec.kv_heads, spec.kv_group, spec.seq_q, spec.seq_k, width, spec.scale,
            spec.causal_offset, **common, **_walk_flags(q.dtype, "tangent_bwd_dkdv", width, tma),
        )
    return dq[..., :e], dk[..., :e], dv[..., :ev], dqt[..., :e], dkt[..., :e], dvt[..., :ev]
