"""Benchmarks of flowkern.flow_map: batched time pairs and multi-schedule sampling against separate calls, and the
fused jump kernel against the PyTorch reference.

    pytest benchmarks/test_bench_flow_map.py --benchmark-columns=min,median,max

Each case names its baseline in its id ("batched" vs "separate", backend names). CPU runs only the small cases that
mean something on CPU (the saving in model-call count); GPU-only cases skip with a reason. On a GPU each timed
function synchronises, and `extra_info` also records `triton.testing.do_bench`'s median (CUDA events) and derived
figures (rows per call, model calls, GB/s for the jump).
"""
from __future__ import annotations

import pytest
import torch

import flowkern.flow_map as fm
from flowkern import use_backend

HAS_CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]
# (batch, dim, hidden) per device: small on CPU
SIZES = {"cpu": (64, 16, 128), "cuda": (4096, 64, 1024)}


class MLP(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 2, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, dim))

    def forward(self, x, t, s):
        return self.net(torch.cat([x, t[:, None].to(x.dtype), s[:, None].to(x.dtype)], dim=1))


class Counted:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, s):
        self.calls += 1
        return self.model(x, t, s)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, device):
    def timed():
        out = fn()
        _sync(device)
        return out

    if device == "cuda":
        import triton.testing

        benchmark.extra_info["do_bench_median_ms"] = triton.testing.do_bench(fn, return_mode="median")
    return benchmark(timed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["batched", "separate"])
@pytest.mark.parametrize("k", [4])
def test_bench_time_pairs_mlp(benchmark, device, mode, k):
    """K time pairs per sample: one `evaluate` call over B·K rows vs K separate model calls + jumps."""
    batch, dim, hidden = SIZES[device]
    torch.manual_seed(0)
    model = Counted(MLP(dim, hidden).to(device))
    x = torch.randn(batch, dim, device=device)
    t = torch.rand(batch, k, device=device)
    s = t * torch.rand(batch, k, device=device)

    def batched():
        return fm.evaluate(model, x, t, s)

    def separate():
        return torch.stack([fm.jump(x, model(x, t[:, i], s[:, i]), t[:, i], s[:, i]) for i in range(k)], dim=1)

    fn = batched if mode == "batched" else separate
    with torch.no_grad():
        model.calls = 0
        fn()
        benchmark.extra_info.update(model_calls=model.calls, rows=batch * k, k=k)
        _run(benchmark, fn, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sample_many", "separate"])
def test_bench_sample_many_mlp(benchmark, device, mode):
    """Schedules of 1, 2, 4, 8 steps: `sample_many` (8 batched rounds) vs four `sample` calls (15 model calls)."""
    batch, dim, hidden = SIZES[device]
    torch.manual_seed(0)
    model = Counted(MLP(dim, hidden).to(device))
    z = torch.randn(batch, dim, device=device)
    steps = (1, 2, 4, 8)

    def many():
        return fm.sample_many(model, z, steps=steps)

    def separate():
        return [fm.sample(model, z, steps=n) for n in steps]

    fn = many if mode == "sample_many" else separate
    with torch.no_grad():
        model.calls = 0
        fn()
        benchmark.extra_info.update(model_calls=model.calls, batch=batch)
        _run(benchmark, fn, device)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (the jump kernel is memory-bound; CPU timings of the "
                                         "Triton interpreter mean nothing)")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("joint", [False, True], ids=["plain", "joint"])
def test_bench_jump_kernel(benchmark, backend, dtype, joint):
    """The fused jump x + (s − t)·u (+ ℓ + (s − t)·D) on [256, 4·32·32] states; GB/s in extra_info."""
    if backend == "cuda":
        pytest.importorskip("ninja", reason="the CUDA extension builds with ninja")
    batch, features = 256, 4 * 32 * 32
    x = torch.randn(batch, features, device="cuda", dtype=dtype)
    u = torch.randn_like(x)
    t, s = torch.rand(batch, device="cuda"), torch.rand(batch, device="cuda")
    lp, d = (torch.randn(batch, device="cuda"), torch.randn(batch, device="cuda")) if joint else (None, None)
    with use_backend(backend), torch.no_grad():
        def fn():
            return fm.jump(x, u, t, s, logp=lp, div=d)

        fn()
        _run(benchmark, fn, "cuda")
        ms = benchmark.extra_info.get("do_bench_median_ms")
        if ms:
            benchmark.extra_info["GB/s"] = 3 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
