"""Per-op benchmarks of the fused JVP layer ops (pytest-benchmark).

GPU cases (skipped on CPU with a reason): each fused op with its tangent (one pass over memory) against the
baseline `torch.func.jvp` of the plain PyTorch layer, timed with CUDA events (`triton.testing.do_bench` median).
`extra_info` holds the op's GB/s (bytes it must move: every input read once, every output written once), the copy
bandwidth measured in the same run on the same number of bytes, their ratio (target ≥ 0.7) and the
baseline's time.

CPU cases: only the linear JVP, where the stacked GEMM (one weight read for primal and tangent) against
`torch.func.jvp(F.linear)` (two GEMMs) means something on CPU.

    pytest benchmarks/test_bench_ops.py --benchmark-only
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from flowkern import ops

HAS_CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")

ROWS, FEATURES, BATCH = 8 * 256, 1152, 8  # DiT-XL/2 width, 8 samples × 256 tokens


@dataclass
class Case:
    name: str
    make: Callable  # (dtype, device) -> (fused args, baseline args)
    fused: Callable
    baseline: Callable
    bytes_moved: Callable  # (dtype) -> bytes the fused pass must move


def _x(dtype, device, *shape):
    return torch.randn(*shape, dtype=dtype, device=device)


def _rows_bytes(n_in: int, n_out: int):
    def count(dtype):
        return (n_in + n_out) * ROWS * FEATURES * torch.finfo(dtype).bits // 8

    return count


def _layer_norm_case():
    def make(dtype, device):
        x, x_t = _x(dtype, device, BATCH, ROWS // BATCH, FEATURES), _x(dtype, device, BATCH, ROWS // BATCH, FEATURES)
        w, b = _x(dtype, device, FEATURES), _x(dtype, device, FEATURES)
        return (x, x_t, w, b), (x, x_t, w, b)

    return Case("layer_norm", make, lambda x, x_t, w, b: ops.layer_norm_jvp(x, x_t, w, b),
                lambda x, x_t, w, b: torch.func.jvp(lambda x: F.layer_norm(x, (FEATURES,), w, b), (x,), (x_t,)),
                _rows_bytes(2, 2))


def _rms_norm_case():
    def make(dtype, device):
        x, x_t = _x(dtype, device, ROWS, FEATURES), _x(dtype, device, ROWS, FEATURES)
        w = _x(dtype, device, FEATURES)
        return (x, x_t, w), (x, x_t, w)

    return Case("rms_norm", make, lambda x, x_t, w: ops.rms_norm_jvp(x, x_t, w),
                lambda x, x_t, w: torch.func.jvp(lambda x: F.rms_norm(x, (FEATURES,), w, 1e-6), (x,), (x_t,)),
                _rows_bytes(2, 2))


def _modulate_case():
    def make(dtype, device):
        x, x_t = _x(dtype, device, BATCH, ROWS // BATCH, FEATURES), _x(dtype, device, BATCH, ROWS // BATCH, FEATURES)
        cond = [_x(dtype, device, BATCH, FEATURES) for _ in range(4)]
        return (x, x_t, *cond), (x, x_t, *cond)

    def baseline(x, x_t, sh, sc, sh_t, sc_t):
        def f(x, sh, sc):
            return F.layer_norm(x, (FEATURES,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None]

        return torch.func.jvp(f, (x, sh, sc), (x_t, sh_t, sc_t))

    return Case("modulate", make, lambda x, x_t, sh, sc, sh_t, sc_t: ops.modulate_jvp(x, sh, sc, x_t, sh_t, sc_t),
                baseline, _rows_bytes(2, 2))


def _gated_residual_case():
    def make(dtype, device):
        xs = [_x(dtype, device, BATCH, ROWS // BATCH, FEATURES) for _ in range(4)]
        g = [_x(dtype, device, BATCH, FEATURES) for _ in range(2)]
        return (xs[0], g[0], xs[1], xs[2], g[1], xs[3]), (xs[0], g[0], xs[1], xs[2], g[1], xs[3])

    def baseline(x, g, y, x_t, g_t, y_t):
        return torch.func.jvp(lambda x, g, y: x + g[:, None] * y, (x, g, y), (x_t, g_t, y_t))

    return Case("gated_residual", make, ops.gated_residual_jvp, baseline, _rows_bytes(4, 2))


def _activation_case(name, fused, plain):
    def make(dtype, device):
        x, x_t = _x(dtype, device, ROWS, 4 * FEATURES), _x(dtype, device, ROWS, 4 * FEATURES)  # the MLP hidden
        return (x, x_t), (x, x_t)

    def count(dtype):
        return 4 * ROWS * 4 * FEATURES * torch.finfo(dtype).bits // 8

    return Case(name, make, fused, lambda x, x_t: torch.func.jvp(plain, (x,), (x_t,)), count)


GPU_CASES = [
    _layer_norm_case(), _rms_norm_case(), _modulate_case(), _gated_residual_case(),
    _activation_case("gelu_tanh", lambda x, t: ops.gelu_jvp(x, t, "tanh"), lambda x: F.gelu(x, approximate="tanh")),
    _activation_case("gelu", ops.gelu_jvp, F.gelu),
    _activation_case("silu", ops.silu_jvp, F.silu),
]


def _median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_bench_op_gpu(benchmark, case: Case, dtype):
    fused_args, base_args = case.make(dtype, torch.device("cuda"))
    nbytes = case.bytes_moved(dtype)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbps = nbytes / (_median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9  # reads n/2, writes n/2
    fused_ms = _median_ms(lambda: case.fused(*fused_args))
    base_ms = _median_ms(lambda: case.baseline(*base_args))
    gbps = nbytes / (fused_ms * 1e-3) / 1e9
    benchmark.extra_info.update({
        "op": case.name, "dtype": str(dtype), "bytes": nbytes, "fused_ms": fused_ms, "gbps": gbps,
        "copy_gbps": copy_gbps, "fraction_of_copy": gbps / copy_gbps, "baseline": "torch.func.jvp(plain layer)",
        "baseline_ms": base_ms, "speedup": base_ms / fused_ms, "device": torch.cuda.get_device_name(),
    })
    benchmark(lambda: (case.fused(*fused_args), torch.cuda.synchronize()))


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_bench_time_embedding_gpu(benchmark, dtype):
    t, s = torch.rand(256, device="cuda"), torch.rand(256, device="cuda")
    ms = _median_ms(lambda: ops.time_embedding_jvp(t, s, 256, torch.ones_like(t), time_scale=1000.0))
    benchmark.extra_info.update({"op": "time_embedding", "fused_ms": ms, "device": torch.cuda.get_device_name()})
    benchmark(lambda: (ops.time_embedding_jvp(t, s, 256, torch.ones_like(t)), torch.cuda.synchronize()))


@pytest.mark.parametrize("impl", ["fused_stacked_gemm", "torch_func_jvp"])
def test_bench_linear_jvp_cpu(benchmark, impl):
    """Linear JVP on CPU: [x; ẋ] through one GEMM vs torch.func.jvp(F.linear) (two GEMMs). GFLOP/s in extra_info."""
    torch.manual_seed(0)
    x, x_t = torch.randn(512, 384), torch.randn(512, 384)
    w, b = torch.randn(1536, 384), torch.randn(1536)
    if impl == "fused_stacked_gemm":
        fn = lambda: ops.linear_jvp(x, x_t, w, b)  # noqa: E731
    else:
        fn = lambda: torch.func.jvp(lambda x: F.linear(x, w, b), (x,), (x_t,))  # noqa: E731
    benchmark.extra_info.update({"impl": impl, "baseline": "torch_func_jvp", "flop": 2 * 2 * 512 * 384 * 1536})
    benchmark(fn)
    benchmark.extra_info["gflops"] = benchmark.extra_info["flop"] / benchmark.stats.stats.median / 1e9
