"""Pure-PyTorch Hutchinson probes: a `torch.Generator` seeded by (seed, stream), and a plain dot-product reduction.

Deterministic for a given (seed, stream); identically distributed to the Philox probes of the Triton and CUDA
backends, not equal to them. Layout [K, B, D] (probe, sample, flattened element).
"""
from __future__ import annotations

import torch

from flowkern._precision import accumulation_dtype

RADEMACHER, GAUSSIAN = 0, 1


def _generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B1 + stream * 0x85EBCA77 + 1) % (2 ** 63))
    return g


def generate_probes(probes: int, batch: int, dim: int, *, seed: int, stream: int, dist: int, dtype: torch.dtype,
                    device: torch.device):
    """(z,): the [probes, batch, dim] probes of (seed, stream) in `dtype`."""
    g = _generator(seed, stream, device)
    shape = (probes, batch, dim)
    if dist == RADEMACHER:
        return ((torch.randint(0, 2, shape, generator=g, device=device, dtype=torch.int8) * 2 - 1).to(dtype),)
    return (torch.randn(shape, generator=g, device=device, dtype=dtype),)


def probe_dot(z: torch.Tensor, jz: torch.Tensor):
    """(est,): est[k, b] = Σ_i z[k, b, i]·jz[k, b, i] in the accumulation dtype (z cannot be regenerated cheaply
    from a Generator, so the caller keeps it)."""
    acc = accumulation_dtype(jz.dtype)
    return ((z.to(acc) * jz.to(acc)).sum(-1),)
