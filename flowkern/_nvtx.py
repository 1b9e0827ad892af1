"""NVTX ranges for Nsight Systems / Nsight Compute, free unless FLOWKERN_NVTX=1.

Ranges go through the `nvtx` package (domain "flowkern") where it is installed, else through CUDA PyTorch's
`torch.cuda.nvtx`; where neither can mark a range (a CPU PyTorch build without the package), FLOWKERN_NVTX=1 warns
once and marks nothing. Every public op and training phase opens one range named after it (docs/profiling.md).
"""
from __future__ import annotations

import contextlib
import warnings

from flowkern._config import nvtx_enabled

_NO_RANGE = contextlib.nullcontext()
_marker = None  # (push, pop), resolved on the first range


def _resolve():
    try:
        import nvtx  # works with or without CUDA torch; attributes looked up per call (tests patch them)

        return (lambda name: nvtx.push_range(name, domain="flowkern")), (lambda: nvtx.pop_range(domain="flowkern"))
    except ImportError:
        pass
    import torch

    try:
        torch.cuda.nvtx.range_push("flowkern")
        torch.cuda.nvtx.range_pop()
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    except Exception:  # noqa: BLE001 - a CPU build's NVTX stub raises
        warnings.warn("FLOWKERN_NVTX=1, but neither the nvtx package nor CUDA PyTorch's NVTX is available: "
                      "no ranges are marked (pip install nvtx)", RuntimeWarning, stacklevel=4)
        return (lambda name: None), (lambda: None)


@contextlib.contextmanager
def _range(name: str):
    global _marker
    if _marker is None:
        _marker = _resolve()
    push, pop = _marker
    push(name)
    try:
        yield
    finally:
        pop()


def nvtx_range(name: str):
    """``with nvtx_range("flowkern.attention"): ...`` marks a range when FLOWKERN_NVTX=1, else does nothing (a
    shared null context: no per-call generator)."""
    return _range(name) if nvtx_enabled() else _NO_RANGE
