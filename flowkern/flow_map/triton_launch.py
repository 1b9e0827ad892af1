"""Host launcher of the Triton flow-map jump: grid and block sizes, then one launch. No maths here."""
from __future__ import annotations

import triton

MAX_BLOCK_F = 1024
TILE = 2048  # elements per program when several samples share one (small F)


def _kernels():
    # Imported on first use: importing Triton kernels decides interpreter vs compiled mode for the process.
    from flowkern.kernels import flow_map as flow_map_jump

    return flow_map_jump


def blocks(features: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_F): one sample per program for large F, several for small F."""
    block_f = min(MAX_BLOCK_F, triton.next_power_of_2(max(features, 1)))
    block_b = max(1, min(64, TILE // block_f))
    return block_b, block_f


def jump_fwd(x, u, t, s, logp, div, y, logp_out):
    """Write x + (s − t)·u to y ([B, F], unit feature stride) and, with logp, ℓ + (s − t)·D to logp_out ([B])."""
    batch, features = x.shape
    if batch == 0 or (features == 0 and logp is None):
        return
    block_b, block_f = blocks(features)
    grid = (triton.cdiv(batch, block_b), max(1, triton.cdiv(features, block_f)))
    if grid[1] > 65535:
        raise ValueError(f"flowkern.flow_map.jump: {features} features per sample is more than the Triton grid "
                         f"allows ({65535 * block_f}); use the 'torch' backend")
    has_logp = logp is not None
    lp, d, lpo = (logp, div, logp_out) if has_logp else (t, t, t)
    _kernels().flow_map_jump_kernel[grid](
        x, u, t, s, y, lp, d, lpo,
        batch, features,
        x.stride(0), u.stride(0), y.stride(0), t.stride(0), s.stride(0), lp.stride(0), d.stride(0), lpo.stride(0),
        HAS_LOGP=has_logp, BLOCK_B=block_b, BLOCK_F=block_f,
    )
