"""NVTX ranges for Nsight Systems, free unless FLOWKERN_NVTX=1."""
from __future__ import annotations

import contextlib

from flowkern._config import nvtx_enabled

_NO_RANGE = contextlib.nullcontext()


def _push_pop():
    try:
        import nvtx  # the `nvtx` package works with or without CUDA torch

        return (lambda name: nvtx.push_range(name, domain="flowkern")), (lambda: nvtx.pop_range(domain="flowkern"))
    except ImportError:  # pragma: no cover - nvtx is a declared dependency
        import torch

        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop


@contextlib.contextmanager
def _range(name: str):
    push, pop = _push_pop()
    push(name)
    try:
        yield
    finally:
        pop()


def nvtx_range(name: str):
    """``with nvtx_range("flowkern.attention"): ...`` marks a range when FLOWKERN_NVTX=1, else does nothing (a
    shared null context: no per-call generator)."""
    return _range(name) if nvtx_enabled() else _NO_RANGE
