"""The CUDA C++ extension built from `csrc/`, lazily, where CUDA PyTorch exists.

Layout of `csrc/` (one op family per trio of files):
* `<name>.cu`, `<name>.h`: CUDA kernels and their launch functions, free of torch headers, so `nvcc -c` compiles
  them on any machine with nvcc (CI does, as a compile-only test). Launchers take raw pointers, sizes and a
  `cudaStream_t`.
* `<name>_binding.cpp`: the only file that includes torch headers. It registers the op with
  `TORCH_LIBRARY_FRAGMENT(flowkern, m)` / `TORCH_LIBRARY_IMPL(flowkern, CUDA, m)`, so every binding file composes
  into one extension and ops are called as `torch.ops.flowkern.<op>`.

`load()` compiles every `.cu` and `*_binding.cpp` with `torch.utils.cpp_extension.load` (ninja, cached under
TORCH_EXTENSIONS_DIR) on first use. `cannot_serve(device, dtype)` says why the `cuda` backend cannot take an input,
or returns None.
"""
from __future__ import annotations

import functools
import glob
import os

import torch

from flowkern._config import verbose_build

CSRC_DIRS = (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"),  # installed: shipped as flowkern/csrc
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"),  # source tree
)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def csrc_dir() -> str | None:
    for path in CSRC_DIRS:
        if glob.glob(os.path.join(path, "*.cu")):
            return path
    return None


def sources() -> list[str]:
    root = csrc_dir()
    if root is None:
        return []
    return sorted(glob.glob(os.path.join(root, "*.cu"))) + sorted(glob.glob(os.path.join(root, "*_binding.cpp")))


class CudaExtensionUnavailable(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def load():
    """Build (first call) and load the extension; raises CudaExtensionUnavailable with the reason."""
    if torch.version.cuda is None:
        raise CudaExtensionUnavailable("this PyTorch build has no CUDA: the flowkern CUDA extension needs CUDA "
                                       "PyTorch (use the 'triton' or 'torch' backend)")
    srcs = sources()
    if not srcs:
        raise CudaExtensionUnavailable("no CUDA sources found (csrc/ is missing from this installation)")
    try:
        from torch.utils.cpp_extension import load as _load

        _load(name="flowkern_cuda", sources=srcs, extra_cuda_cflags=["-O3", "-lineinfo"],
              extra_cflags=["-O3"], is_python_module=False, verbose=verbose_build())
    except Exception as exc:  # the compiler's own message is the actionable part
        raise CudaExtensionUnavailable(
            f"building the flowkern CUDA extension from {csrc_dir()} failed: {exc}. Set FLOWKERN_VERBOSE_BUILD=1 to "
            "see the compiler output; delete TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) if the build "
            "is stale.") from exc
    return torch.ops.flowkern


def cannot_serve(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors, not {device.type}"
    if dtype not in CUDA_DTYPES:
        return f"the CUDA kernels take float16, bfloat16 and float32, not {dtype}"
    try:
        load()
    except CudaExtensionUnavailable as exc:
        return str(exc)
    return None
