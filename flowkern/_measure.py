"""Time and peak memory of a callable, on CUDA or CPU; used by the demo and the benchmarks."""
from __future__ import annotations

import statistics
import time

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _proc_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`, `mallopt`), so that the call measured next faults
    in every page it uses: otherwise memory freed earlier in the process is reused without raising the resident set,
    and the high-water mark under-counts. Large allocations are also sent through mmap (fixed 64 KiB threshold)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc: measure as is
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def peak_memory_bytes(fn, device: torch.device) -> int | None:
    """Peak memory that one call of `fn` adds on top of what is allocated before it.

    CUDA: the caching allocator's peak. CPU (Linux): the resident-set high-water mark, reset through
    /proc/self/clear_refs just before the call, after returning freed heap memory to the OS so that reused memory
    counts; None where that is not available.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_free_heap()
    before = _proc_kib("VmRSS")
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    peak = _proc_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def median_time_s(fn, device: torch.device, *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of `fn` in seconds; on CUDA through `triton.testing.do_bench` (CUDA events)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_jvp_flops(b: int, h: int, nq: int, nk: int, d: int, is_causal: bool = False) -> float:
    """FLOPs counted for forward + tangent: 12·B·H·Nq·Nk·D (six GEMMs), halved when is_causal."""
    flops = 12.0 * b * h * nq * nk * d
    return flops / 2 if is_causal else flops
