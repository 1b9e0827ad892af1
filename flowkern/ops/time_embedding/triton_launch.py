"""Triton host launcher of the time_embedding family (kernels/time_embedding.py): allocate, grid, launch.

Same signatures as `flowkern.ops.time_embedding.reference`.
"""
from __future__ import annotations

import torch
import triton

from flowkern._fused import kernel_module
from flowkern.ops._launch import placeholder, stride0


def _block_h(half: int) -> int:
    return triton.next_power_of_2(half)


def time_embedding_fwd(t, s, t_t, s_t, freqs, *, dim: int, delta: bool):
    batch, half = t.shape[0], freqs.shape[0]
    e = torch.empty((batch, 2 * dim), dtype=torch.float32, device=t.device)
    e_t = torch.empty((batch, 2 * dim), dtype=torch.float32, device=t.device) if t_t is not None else None
    kernel_module("time_embedding").time_embedding_fwd_kernel[(batch,)](
        t, s, placeholder(t_t, t), placeholder(s_t, s), freqs, e, placeholder(e_t, e), e.stride(0), stride0(e_t), half, dim,
        DELTA=delta, HAS_TANGENT=t_t is not None, BLOCK_H=_block_h(half),
    )
    return e, e_t


def time_embedding_bwd(t, s, freqs, de, *, dim: int, delta: bool):
    batch, half = t.shape[0], freqs.shape[0]
    dt = torch.empty(batch, dtype=torch.float32, device=t.device)
    ds = torch.empty(batch, dtype=torch.float32, device=t.device)
    kernel_module("time_embedding").time_embedding_bwd_kernel[(batch,)](
        t, s, freqs, de, dt, ds, de.stride(0), half, dim, DELTA=delta, BLOCK_H=_block_h(half),
    )
    return dt, ds
