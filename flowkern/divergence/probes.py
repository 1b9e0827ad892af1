"""Hutchinson probes on each backend: generation and the probe·(J·probe) reduction.

* ``triton`` / ``cuda``: counter-based Philox probes (see `kernels/divergence.py`; `csrc/hutchinson.cu` is the same
  map, so the two backends give the same Rademacher probes bit for bit and Gaussian probes equal up to the last
  bits of the device's log/sin/cos). The reduction regenerates each probe instead of reading it back.
* ``torch``: probes from a `torch.Generator` seeded by (seed, stream); the reduction is a plain dot product.

Every backend is deterministic for a given (seed, stream); across backends the probes are identically distributed
(and, for triton vs cuda Rademacher, identical). Layout everywhere: [K, B, D] (probe, sample, flattened element).
"""
from __future__ import annotations

import torch

from flowkern._fused import apply_dual
from flowkern.divergence import cuda_launch, reference, triton_launch
from flowkern.divergence.op import ProbeReduceOp
from flowkern.divergence.reference import GAUSSIAN, RADEMACHER

DISTRIBUTIONS = {"rademacher": RADEMACHER, "gaussian": GAUSSIAN}
LAUNCHERS = {"torch": reference, "triton": triton_launch, "cuda": cuda_launch}


def generate(backend: str, probes: int, batch: int, dim: int, *, seed: int, stream: int, distribution: str,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The [probes, batch, dim] probe tensor of (seed, stream) on `backend`, in `dtype`."""
    return LAUNCHERS[backend].generate_probes(probes, batch, dim, seed=seed, stream=stream,
                                              dist=DISTRIBUTIONS[distribution], dtype=dtype, device=device)[0]


def reduce(backend: str, jz: torch.Tensor, probes: torch.Tensor | None, *, seed: int, stream: int,
           distribution: str) -> torch.Tensor:
    """Per-probe estimates [K, B] (float32, float64 for float64 inputs) of z_kbᵀ(J z_kb).

    `probes` is the tensor from `generate` on the torch backend (a Generator cannot be rewound cheaply) and is
    ignored (may be None) on triton/cuda, which regenerate it."""
    if backend == "torch":
        return reference.probe_dot(probes, jz)[0]
    op = ProbeReduceOp("flowkern.divergence", backend, seed, stream, DISTRIBUTIONS[distribution])
    return apply_dual(op, jz)
