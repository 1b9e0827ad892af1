"""The precision policy, decided in one place (docs/precision.md).

Every op computes in an *accumulation dtype*: float64 for float64 inputs (the reference path and the float64 test
oracles), float32 for everything else (float16, bfloat16, float32). Outputs come back in the input dtype; statistics
(mean, rstd, log-sum-exp), times and log-densities stay in the accumulation dtype.
"""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
