"""Benchmark setup: `pytest benchmarks/` (pytest-benchmark). GPU cases skip with a reason on CPU; CPU cases run
only where a CPU number means something (memory scaling of the reference)."""
from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="CPU benchmark: the GPU cases cover this on a GPU")


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
