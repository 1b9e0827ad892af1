"""Every environment variable flowkern reads, in one place.

| variable          | values                    | default | effect                                                 |
|-------------------|---------------------------|---------|--------------------------------------------------------|
| FLOWKERN_BACKEND  | auto, triton, cuda, torch | auto    | backend for every op (see `flowkern._dispatch`)        |
| FLOWKERN_NVTX     | 0, 1                      | 0       | NVTX ranges around public ops and training phases      |
| FLOWKERN_AUTOTUNE | 0, 1                      | 1       | autotune Triton block sizes on a GPU (0: one config)   |
| TRITON_INTERPRET  | 0, 1 (read by Triton)     | 0       | run Triton kernels in Triton's CPU interpreter         |

Values are read on every call (cheap), so a test or a script can change them at run time.
`flowkern.use_backend(name)` overrides FLOWKERN_BACKEND inside a ``with`` block.
"""
from __future__ import annotations

import contextlib
import os
import threading

BACKENDS = ("auto", "triton", "cuda", "torch")

_local = threading.local()


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend` block, else FLOWKERN_BACKEND, else 'auto'."""
    override = getattr(_local, "backend", None)
    if override is not None:
        return override
    value = os.environ.get("FLOWKERN_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FLOWKERN_BACKEND={value!r} is not one of {BACKENDS}")
    return value


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend `name` (one of 'auto', 'triton', 'cuda', 'torch')."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def nvtx_enabled() -> bool:
    return _env_flag("FLOWKERN_NVTX")


def autotune_enabled() -> bool:
    """Read once, when the kernel modules are imported (Triton's autotuner is set up at import)."""
    return os.environ.get("FLOWKERN_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1)."""
    return _env_flag("TRITON_INTERPRET")
