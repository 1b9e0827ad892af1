"""Host launchers of the Triton Philox probes and the fused probe·(J·probe) reduction (`kernels/divergence.py`)."""
from __future__ import annotations

import torch

from flowkern._fused import kernel_module

_TILE = 4096  # elements per program: ROWS rows × CB counters × 4 lanes
_MAX_CB = 512


def _tiling(n_rows: int, n_elem: int):
    """(ROWS, CB, grid) for a [n_rows, n_elem] problem: CB counters (4 elements each) per row, enough rows per
    program to fill about _TILE elements (many rows when samples are small, one row and many chunks when large)."""
    import triton

    cb = max(2, min(_MAX_CB, triton.next_power_of_2(triton.cdiv(n_elem, 4))))
    rows = max(1, min(triton.next_power_of_2(n_rows), _TILE // (4 * cb)))
    return rows, cb, (triton.cdiv(n_rows, rows), triton.cdiv(triton.cdiv(n_elem, 4), cb))


def generate_probes(probes: int, batch: int, dim: int, *, seed: int, stream: int, dist: int, dtype: torch.dtype,
                    device: torch.device):
    """(z,): the [probes, batch, dim] Philox probes of (seed, stream) in `dtype`."""
    out = torch.empty((probes, batch, dim), dtype=dtype, device=device)
    rows, cb, grid = _tiling(probes * batch, dim)
    kernel_module("divergence").hutchinson_probes_kernel[grid](out, dim, probes * batch, batch, seed, stream,
                                                               DIST=dist, ROWS=rows, CB=cb)
    return (out,)


def probe_reduce(jz: torch.Tensor, seed: int, stream: int, dist: int):
    """(est,): est[k, b] = Σ_i z[k, b, i]·jz[k, b, i] (float32), z regenerated from (seed, stream)."""
    probes, batch, dim = jz.shape
    jz = jz.contiguous()
    rows, cb, grid = _tiling(probes * batch, dim)
    n_chunks = grid[1]
    partial = torch.empty((probes * batch, n_chunks), dtype=torch.float32, device=jz.device)
    kernel_module("divergence").hutchinson_reduce_kernel[grid](jz, partial, dim, probes * batch, batch, n_chunks,
                                                               seed, stream, DIST=dist, ROWS=rows, CB=cb)
    return (partial.sum(1).view(probes, batch),)
