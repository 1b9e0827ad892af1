"""Host launchers of the Triton attention kernels: allocate outputs, compute grids, launch. No maths here."""
from __future__ import annotations

import torch
import triton

from flowkern._config import triton_interpreting
from flowkern._fused import kernel_module
from flowkern.attention.spec import AttentionSpec, expand_mask

LOG2E = 1.4426950408889634


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = triton_interpreting() and dtype == torch.bfloat16  # the interpreter's bfloat16 dot is wrong
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": upcast, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _mask_args(attn_mask, spec: AttentionSpec, like: torch.Tensor):
    mask = expand_mask(attn_mask, spec)
    if mask is None:
        return like, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, mask.stride()


def attention_fwd(q, k, v, q_t, k_t, v_t, attn_mask, spec: AttentionSpec):
    """O, Ȯ (None without tangents) and the natural-log LSE [B, Hq, Nq] float32, from one fused kernel pass."""
    kern = kernel_module("attention.configs")
    has_tangent = q_t is not None
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    o_t = torch.empty(q.shape, dtype=q.dtype, device=q.device) if has_tangent else None
    lse = torch.empty((spec.batch, spec.q_heads, spec.seq_q), dtype=torch.float32, device=q.device)
    mask, mask_strides = _mask_args(attn_mask, spec, q)
    tangents = (q_t, k_t, v_t, o_t) if has_tangent else (q, k, v, o)
    zero = (0, 0, 0, 0)

    def grid(meta):
        return (triton.cdiv(spec.seq_q, meta["BLOCK_M"]), spec.batch * spec.q_heads)

    kern.attention_fwd[grid](
        q, k, v, *tangents[:3], mask, o, tangents[3], lse,
        *q.stride(), *k.stride(), *v.stride(),
        *(q_t.stride() if has_tangent else zero), *(k_t.stride() if has_tangent else zero),
        *(v_t.stride() if has_tangent else zero),
        *mask_strides, *o.stride(), *(o_t.stride() if has_tangent else zero),
        spec.q_heads, spec.kv_group, spec.seq_q, spec.seq_k, spec.head_dim, spec.scale, spec.scale * LOG2E,
        HAS_TANGENT=has_tangent, CAUSAL=spec.causal, MASK_KIND=spec.mask_kind,
        BLOCK_D=_block_d(spec.head_dim), **_dot_flags(q.dtype),
    )
    return o, o_t, lse


def attention_bwd(q, k, v, o, lse, do, attn_mask, spec: AttentionSpec):
    """dQ, dK, dV of O (flash backward from the saved LSE)."""
    kern = kernel_module("attention.configs")
    block_d = _block_d(spec.head_dim)
    delta = torch.empty((spec.batch, spec.q_heads, spec.seq_q), dtype=torch.float32, device=q.device)
    kern.attention_bwd_delta[(triton.cdiv(spec.seq_q, kern.DELTA_BLOCK_M), spec.batch * spec.q_heads)](
        o, do, delta, *o.stride(), *do.stride(), spec.q_heads, spec.seq_q, spec.head_dim,
        BLOCK_M=kern.DELTA_BLOCK_M, BLOCK_D=block_d,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mask, mask_strides = _mask_args(attn_mask, spec, q)
    common = dict(CAUSAL=spec.causal, MASK_KIND=spec.mask_kind,
                  BLOCK_D=block_d, **_dot_flags(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *mask_strides)

    kern.attention_bwd_dkdv[lambda meta: (triton.cdiv(spec.seq_k, meta["BLOCK_N"]), spec.batch * spec.kv_heads)](
        q, k, v, do, lse, delta, mask, dk, dv, *strides, *dk.stride(), *dv.stride(),
        spec.q_heads, spec.kv_heads, spec.kv_group, spec.seq_q, spec.seq_k, spec.head_dim,
        spec.scale, spec.scale * LOG2E, **common,
    )
    kern.attention_bwd_dq[lambda meta: (triton.cdiv(spec.seq_q, meta["BLOCK_M"]), spec.batch * spec.q_heads)](
        q, k, v, do, lse, delta, mask, dq, *strides, *dq.stride(),
        spec.q_heads, spec.kv_group, spec.seq_q, spec.seq_k, spec.head_dim, spec.scale, spec.scale * LOG2E,
        **common,
    )
    return dq, dk, dv
