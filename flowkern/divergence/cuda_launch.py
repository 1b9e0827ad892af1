"""Host launchers of the CUDA Philox probes and reduction (`csrc/hutchinson.cu`, ops `torch.ops.flowkern.*`)."""
from __future__ import annotations

import torch

from flowkern import _cuda_ext


def generate_probes(probes: int, batch: int, dim: int, *, seed: int, stream: int, dist: int, dtype: torch.dtype,
                    device: torch.device):
    """(z,): the [probes, batch, dim] Philox probes of (seed, stream) in `dtype` (the Triton map, bit for bit for
    Rademacher)."""
    out = torch.empty((probes, batch, dim), dtype=dtype, device=device)
    _cuda_ext.load().hutchinson_probes_(out, seed, stream, dist)
    return (out,)


def probe_reduce(jz: torch.Tensor, seed: int, stream: int, dist: int):
    """(est,): est[k, b] = Σ_i z[k, b, i]·jz[k, b, i] (float32), z regenerated from (seed, stream)."""
    return (_cuda_ext.load().hutchinson_reduce(jz.contiguous(), seed, stream, dist),)
