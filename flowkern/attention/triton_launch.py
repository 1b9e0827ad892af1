"""Host launchers of the Triton attention kernels: allocate outputs, compute grids, launch. No maths here.

The kernels take one head dim for q, k and v. A value head dim Ev ≠ E is served by zero-padding the narrower side
to max(E, Ev) (zero columns of q and k leave every score unchanged; zero columns of v give zero output columns,
sliced off): one copy of the padded tensors, only in that case.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton

from flowkern._config import split_tiles, tma_loads, triton_interpreting
from flowkern._fused import kernel_module
from flowkern.attention.spec import AttentionSpec, expand_mask


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = triton_interpreting() and dtype == torch.bfloat16  # the interpreter's bfloat16 dot is wrong
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": upcast, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _walk_flags(dtype: torch.dtype, kernel: str, head_dim: int, tma: bool) -> dict:
    """The constexprs of a tile-walking attention kernel: the dot flags, the loads (`tma`) and the loop structure
    (`split_tiles`; `kernel` is its name in kernels/attention/configs.py's SPLIT_BEFORE_3_9)."""
    kern = kernel_module("attention.configs")
    split = split_tiles(before_3_9=kern.splits_before_3_9(kernel, head_dim, tma))
    return {"SPLIT_TILES": split, "TMA": tma, **_dot_flags(dtype)}


def _tma_ready(*tensors: torch.Tensor | None) -> bool:
    """Whether every [B, H, N, D] tensor can be read through a TMA descriptor of its (batch, head) matrices:
    contiguous last dim, base address and every stride that moves between rows or matrices a multiple of 16 bytes
    (strides of a size-1 dim are never multiplied by an index ≠ 0)."""
    for x in tensors:
        if x is None:
            continue
        size = x.element_size()
        if x.stride(-1) != 1 or x.data_ptr() % 16:
            return False
        if any(n > 1 and (stride * size) % 16 for n, stride in zip(x.shape[:-1], x.stride()[:-1])):
            return False
    return True


class _ScratchAllocator:
    """Global memory for the TMA descriptors a kernel builds on the device (128 bytes a descriptor a program),
    from torch's caching allocator on the launch's stream device."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, size: int, alignment: int, stream):
        buffer = torch.empty(size + alignment, dtype=torch.int8, device=self.device)
        start = -buffer.data_ptr() % alignment
        return buffer[start:start + size]  # freed after the launch, stream-ordered like any torch tensor


@contextlib.contextmanager
def _descriptor_scratch(device: torch.device, enabled: bool):
    """Triton's allocator for device-built descriptors, set for this launch only (a ContextVar: an allocator the
    caller set is back in place afterwards)."""
    if not enabled or triton_interpreting():
        yield
        return
    from triton.runtime import _allocation

    allocator = getattr(_allocation, "_allocator", None)
    if allocator is None:  # a Triton without the ContextVar (3.6 to 3.9 have it): the public, global setter
        triton.set_allocator(_ScratchAllocator(device))
        yield
        return
    token = allocator.set(_ScratchAllocator(device))
    try:
        yield
    finally:
        allocator.reset(token)


@contextlib.contextmanager
def _tile_loads(device: torch.device, *tensors: torch.Tensor | None):
    """The TMA constexpr of one launch whose walked tiles come from `tensors` (`tma_loads` and `_tma_ready`),
    yielded with the descriptors' scratch allocator in place for the launch."""
    tma = tma_loads(device) and _tma_ready(*tensors)
    with _descriptor_scratch(device, tma):
        yield tma


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _padded(x: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """x with its last dim zero-padded to `width` (x itself when it already has it)."""
    if x is None or x.shape[-1] == width:
        return x
    return F.pad(x, (0, width - x.shape[-1]))


def _mask_args(attn_mask, spec: AttentionSpec, like: torch.Tensor):
    mask = expand_mask(attn_mask, spec)
    if mask is None:
        return like, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, mask.stride()


def _row_stats(spec: AttentionSpec, device) -> torch.Tensor:
    """[B, Hq, Nq, 2] float32: the row max m and 1/l (l the row sum of exp(S − m)) of every query row."""
    return torch.empty((spec.batch, spec.q_heads, spec.seq_q, 2), dtype=torch.float32, device=device)


def attention_fwd(q, k, v, q_t, k_t, v_t, attn_mask, spec: AttentionSpec):
    """O, Ȯ (None without tangents) and the row statistics [B, Hq, Nq, 2] (m, 1/l) float32, from one fused pass."""
    kern = kernel_module("attention.configs")
    width = spec.padded_head_dim
    q, k, v, q_t, k_t, v_t = (_padded(x, width) for x in (q, k, v, q_t, k_t, v_t))
    has_tangent = q_t is not None
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    o_t = torch.empty(q.shape, dtype=q.dtype, device=q.device) if has_tangent else None
    stats = _row_stats(spec, q.device)
    mask, mask_strides = _mask_args(attn_mask, spec, q)
    tangents = (q_t, k_t, v_t, o_t) if has_tangent else (q, k, v, o)
    zero = (0, 0, 0, 0)

    def grid(meta):
        return (triton.cdiv(spec.seq_q, meta["BLOCK_M"]), spec.batch * spec.q_heads)

    with _tile_loads(q.device, k, v, k_t, v_t) as tma:
        kern.attention_fwd[grid](
            q, k, v, *tangents[:3], mask, o, tangents[3], stats,
            *q.stride(), *k.stride(), *v.stride(),
            *(q_t.stride() if has_tangent else zero), *(k_t.stride() if has_tangent else zero),
            *(v_t.stride() if has_tangent else zero),
            *mask_strides, *o.stride(), *(o_t.stride() if has_tangent else zero),
            spec.q_heads, spec.kv_group, spec.seq_q, spec.seq_k, width, spec.scale, spec.causal_offset,
            HAS_TANGENT=has_tangent, CAUSAL=spec.is_causal, MASK_KIND=spec.mask_kind, BLOCK_D=_block_d(width),
            **_walk_flags(q.dtype, "fwd_tangent" if has_tangent else "fwd", width, tma),
        )
    dv = spec.head_dim_v
    return o[..., :dv], (o_t[..., :dv] if has_tangent else None), stats


def attention_bwd(q, k, v, o, stats, do, attn_mask, spec: AttentionSpec):
    """dQ, dK, dV of O (flash backward from the saved row statistics; dQ first: it computes the Δ dK/dV use)."""
    kern = kernel_module("attention.configs")
    width = spec.padded_head_dim
    q, k, v, o, do = (_padded(x, width) for x in (q, k, v, o, do))
    block_d = _block_d(width)
    delta = torch.empty((spec.batch, spec.q_heads, spec.seq_q), dtype=torch.float32, device=q.device)
    kern.attention_bwd_delta[(triton.cdiv(spec.seq_q, kern.DELTA_BLOCK_M), spec.batch * spec.q_heads)](
        o, do, delta, *o.stride(), *do.stride(), spec.q_heads, spec.seq_q, width,
        BLOCK_M=kern.DELTA_BLOCK_M, BLOCK_D=block_d,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mask, mask_strides = _mask_args(attn_mask, spec, q)
    common = dict(CAUSAL=spec.is_causal, MASK_KIND=spec.mask_kind, BLOCK_D=block_d)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *mask_strides)

    delta_exact = torch.empty_like(delta)
    with _tile_loads(q.device, k, v) as tma:
        kern.attention_bwd_dq[lambda meta: (triton.cdiv(spec.seq_q, meta["BLOCK_M"]), spec.batch * spec.q_heads)](
            q, k, v, do, stats, delta, mask, dq, delta_exact, *strides, *dq.stride(),
            spec.q_heads, spec.kv_group, spec.seq_q, spec.seq_k, width, spec.scale, spec.causal_offset,
            **common, **_walk_flags(q.dtype, "bwd_dq", width, tma),
        )
    with _tile_loads(q.device, q, do) as tma:
        kern.attention_bwd_dkdv[lambda meta: (triton.cdiv(spec.seq_k, meta["BLOCK_N"]), spec.batch * spec.kv_heads)](
            q, k, v, do, stats, delta_exact, mask, dk, dv, *strides, *dk.stride(), *dv.stride(),
            spec.q_heads, spec.kv_heads, spec.kv_group, spec.seq_q, spec.seq_k, width, spec.scale,
            spec.causal_offset, **common, **_walk_flags(q.dtype, "bwd_dkdv", width, tma),
        )
    return dq[..., :spec.head_dim], dk[..., :spec.head_dim], dv[..., :spec.head_dim_v]
