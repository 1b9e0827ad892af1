"""Pure-PyTorch versions of every fused op, same signatures: the CPU fallback and a baseline for benchmarks.

Each runs the public op on the PyTorch backend (flowkern/ops/<family>/reference.py), so it differentiates, takes
forward-mode tangents and accepts float64.
"""
from __future__ import annotations

import functools

from flowkern import ops as _ops
from flowkern._config import use_backend

__all__ = list(_ops.__all__)


def _on_torch(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with use_backend("torch"):
            return fn(*args, **kwargs)

    wrapper.__doc__ = f"`flowkern.ops.{fn.__name__}` on the PyTorch backend.\n\n{fn.__doc__ or ''}"
    return wrapper


globals().update({name: _on_torch(getattr(_ops, name)) for name in __all__})
