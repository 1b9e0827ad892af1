"""Pure-PyTorch flow-map jump: the reference backend and the CPU fallback.

Same maths as `flowkern/kernels/flow_map.py`: h = s − t, y = x + h·u, ℓ' = ℓ + h·D, in float32 (float64 for
float64 inputs), results cast to the output dtype. A multiply then an add (never a fused multiply-add): both are
correctly rounded elementwise, so a row's result does not depend on its position in the batch (the samplers rely
on this for `sample_many` == `sample`, bit for bit).
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def jump_fwd(x, u, t, s, logp, div, y, logp_out):
    """Write x + (s − t)·u to y ([B, F]) and, with logp, ℓ + (s − t)·D to logp_out ([B])."""
    acc = acc_dtype(x.dtype)
    h = s.to(acc) - t.to(acc)  # [B]
    y.copy_(x.to(acc) + h[:, None] * u.to(acc))
    if logp is not None:
        lacc = acc_dtype(logp.dtype)
        logp_out.copy_(logp.to(lacc) + h.to(lacc) * div.to(lacc))
