"""Host launcher of the Triton flow-map jump: grid and block sizes, then one launch. No maths here."""
from __future__ import annotations

import torch

from flowkern._fused import kernel_module

MAX_BLOCK_F = 1024
TILE = 2048  # elements per program when several samples share one (small F)


def allocate(x: torch.Tensor, logp: torch.Tensor | None):
    """Fresh outputs (y like x, logp_out like logp or None): every backend's launcher without `out=`."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, None if logp is None else torch.empty(logp.shape, dtype=logp.dtype, device=logp.device)


def blocks(features: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_F): one sample per program for large F, several for small F."""
    import triton

    block_f = min(MAX_BLOCK_F, triton.next_power_of_2(max(features, 1)))
    block_b = max(1, min(64, TILE // block_f))
    return block_b, block_f


def jump_fwd(x, u, t, s, logp, div, *, out=None):
    """(x + (s − t)·u [B, F], ℓ + (s − t)·D [B] or None) from one launch; x, u with unit feature stride; written
    into `out` = (y, logp_out) when given."""
    import triton

    y, logp_out = allocate(x, logp) if out is None else out
    batch, features = x.shape
    if batch == 0 or (features == 0 and logp is None):
        return y, logp_out
    block_b, block_f = blocks(features)
    grid = (triton.cdiv(batch, block_b), max(1, triton.cdiv(features, block_f)))
    if grid[1] > 65535:
        raise ValueError(f"flowkern.flow_map.jump: {features} features per sample is more than the Triton grid "
                         f"allows ({65535 * block_f}); use the 'torch' backend")
    has_logp = logp is not None
    lp, d, lpo = (logp, div, logp_out) if has_logp else (t, t, t)
    kernel_module("flow_map").flow_map_jump_kernel[grid](
        x, u, t, s, y, lp, d, lpo,
        batch, features,
        x.stride(0), u.stride(0), y.stride(0), t.stride(0), s.stride(0), lp.stride(0), d.stride(0), lpo.stride(0),
        HAS_LOGP=has_logp, BLOCK_B=block_b, BLOCK_F=block_f,
    )
    return y, logp_out
