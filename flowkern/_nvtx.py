"""NVTX ranges for Nsight Systems, free unless FLOWKERN_NVTX=1."""
from __future__ import annotations

import contextlib
import functools

from flowkern._config import nvtx_enabled


def _push_pop():
    try:
        import nvtx  # the `nvtx` package works with or without CUDA torch

        return (lambda name: nvtx.push_range(name, domain="flowkern")), (lambda: nvtx.pop_range(domain="flowkern"))
    except ImportError:  # pragma: no cover - nvtx is a declared dependency
        import torch

        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop


@contextlib.contextmanager
def nvtx_range(name: str):
    """``with nvtx_range("flowkern.attention"): ...`` marks a range when FLOWKERN_NVTX=1, else does nothing."""
    if not nvtx_enabled():
        yield
        return
    push, pop = _push_pop()
    push(name)
    try:
        yield
    finally:
        pop()


def nvtx_annotate(name: str):
    """Decorator form of `nvtx_range`."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with nvtx_range(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
