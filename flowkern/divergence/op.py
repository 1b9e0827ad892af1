"""The fused probe reduction on the op contract (`flowkern._fused`), for the Triton and CUDA backends.

Input jz [K, B, D] (the JVPs J·z_kb); output est[k, b] = z_kbᵀ·jz[k, b] with z regenerated from the op's static
(seed, stream, distribution) instead of read back (docs/estimators.md). The map is linear in jz:
* backward: ∂L/∂jz[k, b, i] = z[k, b, i]·g[k, b] (z regenerated once more);
* tangent: the reduction of the tangent of jz.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flowkern._fused import FusedOp
from flowkern.divergence import cuda_launch, triton_launch

LAUNCHERS = {"triton": triton_launch, "cuda": cuda_launch}


@dataclass(frozen=True)
class ProbeReduceOp(FusedOp):
    name: str
    backend: str
    seed: int
    stream: int
    dist: int

    def _reduce(self, jz: torch.Tensor) -> torch.Tensor:
        return LAUNCHERS[self.backend].probe_reduce(jz, self.seed, self.stream, self.dist)[0]

    def forward(self, inputs, tangents):
        (jz,) = inputs
        return self._reduce(jz), None if tangents is None else self.tangent(inputs, tangents), ()

    def tangent(self, inputs, tangents):
        (jz_t,) = tangents
        return self._reduce(jz_t)

    def tangent_input_grads(self, inputs, tangents, aux, y_t, dy_t, needs):
        return (None,)  # the reduction is linear: its tangent does not depend on jz

    def backward(self, inputs, aux, dy, needs):
        (jz,) = inputs
        z = LAUNCHERS[self.backend].generate_probes(*jz.shape, seed=self.seed, stream=self.stream, dist=self.dist,
                                                    dtype=torch.float32, device=dy.device)[0]
        return ((z * dy[..., None]).to(jz.dtype),)
