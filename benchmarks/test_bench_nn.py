"""A MeanFlow-style training step of DiT-S/2 and DiT-B/2 at 256 tokens, bf16: flowkern vs plain PyTorch.

One step = a no-grad JVP pass (u, du/dt along (v, 1, 0)) + a grad pass + AdamW. flowkern: `flowkern.nn.DiT` with
`flowkern.nn.jvp` (fused JVP kernels). Baseline: the same network in plain PyTorch (tests/nn_reference.py, torch.nn
layers and F ops, loaded with the same weights) with `torch.func.jvp` over math SDPA for the JVP pass (the only stock
SDPA backend with a forward-mode rule) and the default SDPA backend (flash) for the grad pass. Weights bf16, times
float32, images 32×32×4 (a latent), patch 2 -> 256 tokens, batch 32.

`extra_info`: step_ms and peak_mem_GiB of both, speedup and memory ratio (targets: ≥ 2× faster and ≤ 0.6× the
peak memory). GPU cases skip on CPU: a CPU number says nothing about the kernels here.

CPU cases (skipped on a GPU machine): the host cost of a grad pass and of a `flowkern.jvp` pass of MLPFlowMap(2, 128,
3) at batch 256 and of a DiT of S/2 width (12 blocks, 16 tokens, batch 4), PyTorch backend, one thread, against the
plain torch.nn twin timed interleaved in the same run; `extra_info["ratio"]` = flowkern / twin (target ≤ 1.05).

    pytest benchmarks/test_bench_nn.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

import flowkern
import flowkern.nn

from nn_reference import PlainDiT, sdpa_attention

HAS_CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="CPU host-cost benchmark: the GPU cases cover a GPU")

BATCH, IMG, IN_CH = 32, 32, 4  # patch 2: 16 × 16 = 256 tokens


def plain_jvp(model, primals, tangents):
    """Stock PyTorch: torch.func.jvp without grad, SDPA forced to its math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(model, primals, tangents)


def meanflow_step(model, jvp_fn, opt, x, e, t, r):
    """z = (1 − t)x + t·e, v = e − x; target = v − (t − r)·du/dt (no grad); loss ‖u(z, t, r) − target‖² (float32)."""
    tb, rb = t.view(-1, 1, 1, 1).to(x.dtype), r.view(-1, 1, 1, 1).to(x.dtype)
    z = (1 - tb) * x + tb * e
    v = e - x
    _, dudt = jvp_fn(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    target = (v - (tb - rb) * dudt).float()
    loss = (model(z, t, r).float() - target).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def make_models(config: str, device):
    torch.manual_seed(0)
    fk = flowkern.nn.DiT.from_config(config, img_size=IMG, in_ch=IN_CH).to(device, torch.bfloat16)
    with torch.no_grad():  # leave adaLN-zero: every block active, as after some training
        for p in fk.parameters():
            p.add_(0.02 * torch.randn_like(p))
    plain = PlainDiT(fk, attend=sdpa_attention).to(device, torch.bfloat16)
    plain.load_state_dict(fk.state_dict())
    return fk, plain


def make_batch(device):
    gen = torch.Generator(device=device).manual_seed(0)
    x, e = (torch.randn(BATCH, IN_CH, IMG, IMG, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    t = torch.rand(BATCH, generator=gen, device=device)  # float32 times
    return x, e, t, t * torch.rand(BATCH, generator=gen, device=device)


def measure(model, jvp_fn, batch, *, steps=10):
    """(median step ms, peak GiB above the resident model and optimiser state)."""
    import triton.testing

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):  # warm-up: optimiser state, Triton compilation/autotuning, cuBLAS
        meanflow_step(model, jvp_fn, opt, *batch)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    meanflow_step(model, jvp_fn, opt, *batch)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = triton.testing.do_bench(lambda: meanflow_step(model, jvp_fn, opt, *batch), rep=steps * 50,
                                 return_mode="median")
    return ms, peak, opt


@gpu_only
@pytest.mark.parametrize("config", ["S/2", "B/2"])
def test_bench_meanflow_step_dit_gpu(benchmark, config):
    device = torch.device("cuda")
    fk, plain = make_models(config, device)
    batch = make_batch(device)
    base_ms, base_peak, _ = measure(plain, plain_jvp, batch)
    del plain
    torch.cuda.empty_cache()
    ms, peak, opt = measure(fk, flowkern.nn.jvp, batch)

    def step():
        meanflow_step(fk, flowkern.nn.jvp, opt, *batch)
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
    benchmark.extra_info.update({
        "config": f"DiT-{config}", "tokens": fk.num_tokens, "batch": BATCH, "dtype": "bfloat16 weights, float32 times",
        "baseline": "plain PyTorch twin, torch.func.jvp over math SDPA (grad pass: default SDPA)",
        "step_ms": ms, "peak_mem_GiB": peak, "baseline_step_ms": base_ms, "baseline_peak_mem_GiB": base_peak,
        "speedup": base_ms / ms, "memory_ratio": peak / base_peak, "device": torch.cuda.get_device_name(),
    })


# ---- CPU host cost: flowkern networks on the PyTorch backend against their plain torch.nn twins -------------------
#
# On CPU with the torch backend every op runs PyTorch maths, so the time of a pass over its plain twin (the same
# network from torch.nn layers and F ops, same weights) is the host cost flowkern adds per call. One thread, so the
# numbers do not depend on the other processes of the machine. Cases name their baseline; ratio = flowkern / twin.

CPU_REPEATS, CPU_ROUNDS = 5, 9


def _paired_ms(fn, baseline) -> tuple[float, float]:
    """(ms of fn, ms of baseline): each the median over CPU_ROUNDS of the mean time of CPU_REPEATS calls, the two
    interleaved round by round so a load change on the machine hits both (after two warm-up calls each)."""
    import statistics
    import time

    def one_round(f):
        start = time.perf_counter()
        for _ in range(CPU_REPEATS):
            f()
        return (time.perf_counter() - start) / CPU_REPEATS * 1e3

    for f in (fn, fn, baseline, baseline):
        f()
    rounds = [(one_round(fn), one_round(baseline)) for _ in range(CPU_ROUNDS)]
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with flowkern.use_backend("torch"):
        yield
    torch.set_num_threads(previous)


def _cpu_mlp():
    from nn_reference import PlainMLPFlowMap, randomize

    fk = randomize(flowkern.nn.MLPFlowMap(2, 128, 3), std=0.1)
    plain = PlainMLPFlowMap(2, 128, 3)
    plain.load_state_dict(fk.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=gen)
    t = torch.rand(256, generator=gen)
    return fk, plain, (x, t, 0.5 * t), (torch.randn(256, 2, generator=gen), torch.ones(256), torch.zeros(256))


def _cpu_dit():
    from nn_reference import PlainDiT, randomize

    fk = randomize(flowkern.nn.DiT(8, 4, patch=2, hidden=384, depth=12, heads=6), std=0.02)  # 16 tokens
    plain = PlainDiT(fk, attend=sdpa_attention)
    plain.load_state_dict(fk.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.rand(4, generator=gen)
    return fk, plain, (x, t, 0.5 * t), (torch.randn(4, 4, 8, 8, generator=gen), torch.ones(4), torch.zeros(4))


CPU_NETWORKS = {"MLPFlowMap(2,128,3) batch 256": _cpu_mlp, "DiT hidden 384 depth 12, 16 tokens, batch 4": _cpu_dit}


def _grad_pass(model, primals):
    def step():
        model.zero_grad(set_to_none=True)
        model(*primals).square().mean().backward()

    return step


def _twin_jvp(model, primals, tangents):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def step():
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            torch.func.jvp(model, primals, tangents)

    return step


def _record(benchmark, fn, base_fn, *, case, what, baseline):
    ms, base_ms = _paired_ms(fn, base_fn)
    benchmark.pedantic(fn, rounds=CPU_ROUNDS, iterations=CPU_REPEATS, warmup_rounds=1)
    benchmark.extra_info.update({"network": case, "pass": what, "baseline": baseline, "ms": ms,
                                 "baseline_ms": base_ms, "ratio": ms / base_ms, "threads": 1, "backend": "torch"})


@cpu_only
@pytest.mark.parametrize("case", list(CPU_NETWORKS))
def test_bench_cpu_grad_pass(benchmark, one_thread, case):
    """Forward + backward of ‖model(x, t, s)‖² vs the same on the plain torch.nn twin."""
    fk, plain, primals, _ = CPU_NETWORKS[case]()
    _record(benchmark, _grad_pass(fk, primals), _grad_pass(plain, primals), case=case,
            what="grad pass (forward + backward)", baseline="plain torch.nn twin, forward + backward")


@cpu_only
@pytest.mark.parametrize("case", list(CPU_NETWORKS))
def test_bench_cpu_jvp_pass(benchmark, one_thread, case):
    """`flowkern.jvp(model, ...)` vs `torch.func.jvp` of the plain torch.nn twin (no grad, math SDPA)."""
    fk, plain, primals, tangents = CPU_NETWORKS[case]()
    _record(benchmark, lambda: flowkern.nn.jvp(fk, primals, tangents), _twin_jvp(plain, primals, tangents), case=case,
            what="JVP pass (flowkern.jvp)", baseline="plain torch.nn twin, torch.func.jvp under no_grad (math SDPA)")
