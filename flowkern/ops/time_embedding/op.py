"""TimeEmbeddingOp: the sinusoidal embedding of a time pair, its tangent and its backward
(kernels/time_embedding.py)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from flowkern._fused import FusedOp, zeros_if_none
from flowkern.ops._backends import BackendModules
from flowkern.ops.time_embedding import reference

BACKENDS = BackendModules(__package__, reference)  # {"torch": reference, "triton": triton_launch}


@functools.lru_cache(maxsize=64)
def frequency_table(half: int, max_period: float, time_scale: float, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """f_k = time_scale·max_period^(−k/half), k < half, computed in float64 and stored in `dtype` (a constant:
    never modified in place)."""
    k = torch.arange(half, dtype=torch.float64, device=device)
    return (time_scale * torch.exp(-math.log(max_period) * k / half)).to(dtype)


@dataclass(frozen=True)
class TimeEmbeddingOp(FusedOp):
    """E(t, s) [B, 2·dim]; inputs (t, s) as [B] tensors of the compute dtype (float32, or float64 on torch)."""

    name: str
    backend: str
    dim: int
    delta: bool
    max_period: float
    time_scale: float
    n_inputs: ClassVar[int] = 2

    def freqs(self, like: torch.Tensor) -> torch.Tensor:
        """f_k = time_scale·max_period^(−k/half), k < half: the one table every backend uses (built once per
        configuration, dtype and device)."""
        return frequency_table(self.dim // 2, self.max_period, self.time_scale, like.dtype, like.device)

    def forward(self, inputs, tangents):
        t, s = inputs
        t_t = s_t = None
        if tangents is not None:
            t_t, s_t = (zeros_if_none(x_t, x) for x_t, x in zip(tangents, inputs))
        with torch.autocast(t.device.type, enabled=False):
            e, e_t = BACKENDS[self.backend].time_embedding_fwd(t, s, t_t, s_t, self.freqs(t), dim=self.dim,
                                                               delta=self.delta)
        return e, e_t, ()

    def backward(self, inputs, aux, de, needs):
        t, s = inputs
        with torch.autocast(t.device.type, enabled=False):
            dt, ds = BACKENDS[self.backend].time_embedding_bwd(t, s, self.freqs(t), de.contiguous(), dim=self.dim,
                                                               delta=self.delta)
        return dt, ds
