"""Every environment variable flowkern reads, in one place, read once.

| variable          | values                    | default | effect                                                 |
|-------------------|---------------------------|---------|--------------------------------------------------------|
| FLOWKERN_BACKEND  | auto, triton, cuda, torch | auto    | backend for every op (see `flowkern._dispatch`)        |
| FLOWKERN_NVTX     | 0, 1                      | 0       | NVTX ranges around public ops and training phases      |
| FLOWKERN_AUTOTUNE | 0, 1                      | 1       | autotune Triton block sizes on a GPU (0: one config)   |
| TRITON_INTERPRET  | 0, 1 (read by Triton)     | 0       | run Triton kernels in Triton's CPU interpreter         |
| FLOWKERN_VERBOSE_BUILD | 0, 1                 | 0       | show the compiler output of the CUDA extension build   |
| FLOWKERN_SPLIT_TILES | auto, 0, 1            | auto    | attention walks: interior tiles in a loop of their own |
| FLOWKERN_TMA      | auto, 0, 1                | auto    | attention kernels: tiles through TMA descriptors       |

The variables are read when flowkern is imported (an op call reads no environment). A script or a test that
changes one later calls `reload()`; `flowkern.use_backend(name)` overrides FLOWKERN_BACKEND inside a ``with``
block at run time. An invalid FLOWKERN_BACKEND is reported by the first op that asks for a backend.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

BACKENDS = ("auto", "triton", "cuda", "torch")
_FALSE = ("", "0", "false", "no", "off")

_local = threading.local()
_env: dict = {}


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in _FALSE


def reload() -> None:
    """Read the environment variables again (after a change of os.environ)."""
    _env["backend"] = os.environ.get("FLOWKERN_BACKEND", "auto").strip().lower() or "auto"
    _env["nvtx"] = _flag("FLOWKERN_NVTX", "0")
    _env["autotune"] = _flag("FLOWKERN_AUTOTUNE", "1")
    _env["interpret"] = _flag("TRITON_INTERPRET", "0")
    _env["verbose_build"] = _flag("FLOWKERN_VERBOSE_BUILD", "0")
    _env["split_tiles"] = os.environ.get("FLOWKERN_SPLIT_TILES", "auto").strip().lower() or "auto"
    _env["tma"] = os.environ.get("FLOWKERN_TMA", "auto").strip().lower() or "auto"


reload()


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend` block, else FLOWKERN_BACKEND, else 'auto'."""
    override = getattr(_local, "backend", None)
    if override is not None:
        return override
    value = _env["backend"]
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
    return _env["nvtx"]


def autotune_enabled() -> bool:
    """Used once, when the kernel modules are imported (Triton's autotuner is set up at import)."""
    return _env["autotune"]


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1)."""
    return _env["interpret"]


def verbose_build() -> bool:
    """True when the CUDA extension build shows the compiler output (FLOWKERN_VERBOSE_BUILD=1)."""
    return _env["verbose_build"]


# The first Triton release whose compile of the two-loop attention walks was measured spill-free at the pinned tiles
# (sm_90, `benchmarks/kernel_report.py`); on Triton 3.6 the same kernels spill hundreds of registers with pointers
# (RESULTS.md); with TMA descriptors the walks of kernels/attention/configs.py's SPLIT_BEFORE_3_9 split there too.
SPLIT_TILES_FROM = (3, 9)


def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def split_tiles(*, before_3_9: bool = False) -> bool:
    """Whether an attention kernel walks its interior tiles (no bounds or causal tests, pipelined) in a loop of
    their own before the masked edge tiles (True), or every tile in one masked, pipelined loop (False);
    before_3_9: the walk is one that older Triton compiles as two loops without spills too (the kernel's
    `kernels/attention/configs.py: splits_before_3_9`).

    FLOWKERN_SPLIT_TILES=1/0 forces either; 'auto' splits on Triton >= 3.9: its compile of the two loops is
    spill-free and shorter per tile. Triton 3.6 spills hundreds of registers on the same kernels with pointers and
    compiles the one loop spill-free; with descriptors some walks compile as two loops without spills there and
    are 8–34% shorter per score, and 'auto' splits those (`before_3_9`). Both walks give the same results
    (tests/test_attention_tile_walks.py)."""
    value = _tristate("split_tiles", "FLOWKERN_SPLIT_TILES")
    if value == "auto":
        return before_3_9 or _triton_version() >= SPLIT_TILES_FROM
    return value == "1"


def tile_walks() -> str:
    """How the attention kernels walk their tiles here, in words (`split_tiles`)."""
    if split_tiles():
        return "interior + edge loops"
    if split_tiles(before_3_9=True):
        return "one masked loop (interior + edge loops for the walks of SPLIT_BEFORE_3_9 through TMA descriptors)"
    return "one masked loop"


def _tristate(key: str, variable: str) -> str:
    value = _env[key]
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{variable}={value!r} is not one of 'auto', '0', '1'")
    return value


def tma_loads(device) -> bool:
    """Whether the attention kernels read their tiles through TMA tensor descriptors on `device` (the host still
    checks each call's strides and alignment, `flowkern.attention.triton_launch._tma_ready`).

    'auto': on a CUDA device of compute capability 9.0 or newer (the copy engine TMA exists from sm_90 on), never in
    the interpreter. FLOWKERN_TMA=1 forces it wherever the tensors allow (the interpreter emulates descriptors: the
    tests run both paths), 0 turns it off. With descriptors the wide tiles compile with no spill inside their loops
    (benchmarks/RESULTS.md); both paths give the same results (tests/test_attention_tile_walks.py)."""
    value = _tristate("tma", "FLOWKERN_TMA")
    if value != "auto":
        return value == "1"
    import torch

    device = torch.device(device)
    if device.type != "cuda" or triton_interpreting():
        return False
    return _has_tma(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _has_tma(index: int) -> bool:
    """Compute capability ≥ 9.0 (once per device: `tma_loads` runs on every attention launch)."""
    import torch

    return torch.cuda.get_device_capability(index) >= (9, 0)
