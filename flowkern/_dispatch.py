"""Backend selection, shared by every public op.

* ``auto``: Triton for CUDA tensors, the PyTorch reference for CPU tensors, Triton's interpreter for CPU tensors
  when ``TRITON_INTERPRET=1``. Inputs a Triton kernel cannot take (say float64) go to the reference. ``auto`` never
  fails for lack of a backend.
* a backend asked for by name (``FLOWKERN_BACKEND`` or `flowkern.use_backend`) that cannot serve the inputs
  raises a ``ValueError`` naming the backends that could.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from flowkern._config import requested_backend, triton_interpreting

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (looked up once per process)."""
    return importlib.util.find_spec("triton") is not None


def _triton_can_serve(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if Triton can run these inputs, else the reason it cannot."""
    if not triton_available():
        return "triton is not installed"
    if dtype not in _TRITON_DTYPES:
        return f"the Triton kernels take float16, bfloat16 and float32, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not on {device.type}"


_warned_fallback: set = set()  # ops that already warned about a CUDA call falling back to the reference


def select_backend(op: str, device: torch.device, dtype: torch.dtype, *, supported=("triton", "torch"),
                   triton_reason: str | None = None) -> str:
    """Pick the backend for one call of `op` on inputs of this device and dtype.

    `supported` lists the backends the op has; `triton_reason`, when not None, is an op-specific reason why the
    Triton kernel cannot take these inputs (an unsupported head dim, say): under `auto` a CUDA call then falls back
    to the PyTorch reference with a one-time warning per op.
    """
    asked = requested_backend()
    if asked == "auto" and device.type == "cpu" and not triton_interpreting():
        return "torch"  # the common CPU case, decided without building the reasons below
    reasons: dict[str, str | None] = {"torch": None}
    if "triton" in supported:
        reasons["triton"] = triton_reason or _triton_can_serve(device, dtype)
    if "cuda" in supported and asked == "cuda":  # only by name: auto never builds the extension
        from flowkern import _cuda_ext

        reasons["cuda"] = _cuda_ext.cannot_serve(device, dtype)
    for name in ("triton", "cuda", "torch"):
        reasons.setdefault(name, f"{op} has no {name} backend")

    if asked == "auto":
        if device.type == "cuda" or triton_interpreting():
            if reasons["triton"] is None:
                return "triton"
        if device.type == "cuda" and triton_reason and op not in _warned_fallback:
            _warned_fallback.add(op)
            warnings.warn(f"{op}: {triton_reason}; using the PyTorch reference (slow)", stacklevel=3)
        return "torch"
    if reasons[asked] is None:
        return asked
    usable = [name for name in ("triton", "torch") if reasons[name] is None]
    if "cuda" in supported and device.type == "cuda":
        usable.append("cuda (if the extension builds)")
    raise ValueError(f"{op}: backend {asked!r} cannot serve inputs on {device} of {dtype}: {reasons[asked]}. "
                     f"Backends that can: {usable}")
