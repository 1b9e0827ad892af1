"""One MeanFlow training step on a DiT: flowkern one-pass vs flowkern two-pass vs plain PyTorch, time and peak memory
measured in the same run.

A step: z = (1 − t)x + t·e, v = e − x; (u, du/dt) along (v, 1, 0); loss ‖u − sg(v − (t − r)·du/dt)‖² (float32);
backward. The three ways:
* flowkern one-pass: `flowkern.jvp(dit, (z, t, r), tangents, grad=True)`: one forward gives u (with its graph) and the
  fused, stop-gradient du/dt; then the backward.
* flowkern two-pass: a no-grad `flowkern.jvp`, then an ordinary grad pass and the backward.
* plain PyTorch: the `torch.nn` twin of the same weights (tests/nn_reference.py), `torch.func.jvp` with grad on (one
  forward, as MeanFlow's public code does), SDPA forced to its math backend (the only one with a forward-mode rule);
  autograd keeps the tangent's intermediates (the N×N softmax terms included) until the backward.

`extra_info`: step_ms and peak memory of each, and the ratios to plain PyTorch. Targets: GPU (DiT-S/2, 256 tokens,
bf16) one-pass ≥ 2× faster than plain PyTorch at ≤ 0.5× its peak memory; CPU peak memory ≤ 0.5× plain PyTorch at
1024 tokens, CPU time no worse than plain PyTorch.

    pytest benchmarks/test_bench_meanflow.py --benchmark-only
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

import flowkern
import flowkern.nn
from flowkern._measure import peak_memory_bytes

from nn_reference import PlainDiT, randomize, sdpa_attention

HAS_CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="CPU benchmark: the GPU case covers a GPU")


def _loss(u, dudt, v, t, r):
    tb, rb = (a.view(-1, 1, 1, 1) for a in (t, r))
    target = (v.float() - (tb - rb) * dudt.float()).detach()
    return (u.float() - target).square().mean()


def one_pass_step(model, z, t, r, v):
    u, dudt = flowkern.jvp(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), grad=True)
    _loss(u, dudt, v, t, r).backward()


def two_pass_step(model, z, t, r, v):
    _, dudt = flowkern.jvp(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    _loss(model(z, t, r), dudt, v, t, r).backward()


def plain_step(model, z, t, r, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        u, dudt = torch.func.jvp(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    _loss(u, dudt, v, t, r).backward()


WAYS = {"flowkern one-pass": one_pass_step, "flowkern two-pass": two_pass_step, "plain PyTorch": plain_step}


def make_models(device, dtype, *, img, in_ch, **dit):
    torch.manual_seed(0)
    fk = randomize(flowkern.nn.DiT(img, in_ch, time_scale=1.0, **dit), std=0.02).to(device, dtype)
    plain = PlainDiT(fk, attend=sdpa_attention).to(device, dtype)
    plain.load_state_dict(fk.state_dict())
    return fk, plain


def make_batch(device, dtype, batch, in_ch, img):
    gen = torch.Generator(device=device).manual_seed(0)
    x, e = (torch.randn(batch, in_ch, img, img, generator=gen, device=device, dtype=dtype) for _ in range(2))
    t = torch.rand(batch, generator=gen, device=device)  # float32 times
    r = t * torch.rand(batch, generator=gen, device=device)
    tb = t.view(-1, 1, 1, 1).to(dtype)
    return (1 - tb) * x + tb * e, t, r, e - x


def _runner(step, model, batch):
    def run():
        model.zero_grad(set_to_none=True)
        step(model, *batch)
    return run


def _cpu_times_ms(runs: dict, *, repeats: int = 2, rounds: int = 5) -> dict:
    """Median over rounds of the mean of `repeats` calls, the ways interleaved round by round (after a warm-up)."""
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            samples[name].append((time.perf_counter() - start) / repeats * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def _gpu_times_ms(runs: dict) -> dict:
    import triton.testing

    return {name: triton.testing.do_bench(run, rep=200, return_mode="median") for name, run in runs.items()}


def _measure(device, runs: dict, times) -> dict:
    out = {}
    for name, run in runs.items():
        run()  # warm-up (Triton compilation on a GPU, allocator pools)
        peak = peak_memory_bytes(run, device)
        out[name] = {"peak_MiB": None if peak is None else peak / 2**20}
    for name, ms in times(runs).items():
        out[name]["step_ms"] = ms
    return out


def _record(benchmark, fk, batch, results: dict, **info):
    base = results["plain PyTorch"]
    for name, res in results.items():
        if name != "plain PyTorch":
            res["time_vs_plain"] = res["step_ms"] / base["step_ms"]
            if res["peak_MiB"] is not None and base["peak_MiB"]:
                res["memory_vs_plain"] = res["peak_MiB"] / base["peak_MiB"]
    benchmark.pedantic(_runner(one_pass_step, fk, batch), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update({**info, "tokens": fk.num_tokens, "results": results})


@gpu_only
def test_bench_meanflow_step_dit_s2_gpu(benchmark):
    """DiT-S/2 on 32×32×4 latents (256 tokens), batch 32, bf16 weights, float32 times, the Triton backend."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    fk, plain = make_models(device, dtype, img=32, in_ch=4, patch=2, hidden=384, depth=12, heads=6)
    batch = make_batch(device, dtype, 32, 4, 32)
    runs = {name: _runner(step, plain if name == "plain PyTorch" else fk, batch) for name, step in WAYS.items()}
    results = _measure(device, runs, _gpu_times_ms)
    _record(benchmark, fk, batch, results, config="DiT-S/2", rows=32, dtype="bfloat16",
            device_name=torch.cuda.get_device_name())


CPU_CASES = {
    # name: (img, batch, DiT keywords): 16 tokens for the time, 1024 tokens for the memory of the attention JVP
    "small DiT, 16 tokens": (8, 16, {"patch": 2, "hidden": 128, "depth": 4, "heads": 4, "time_dim": 64}),
    "small DiT, 1024 tokens": (64, 1, {"patch": 2, "hidden": 64, "depth": 2, "heads": 2, "time_dim": 32}),
}


@cpu_only
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_bench_meanflow_step_dit_cpu(benchmark, case):
    """The PyTorch backend, one thread, float32."""
    img, batch_size, dit = CPU_CASES[case]
    device, dtype = torch.device("cpu"), torch.float32
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with flowkern.use_backend("torch"):
            fk, plain = make_models(device, dtype, img=img, in_ch=1, **dit)
            batch = make_batch(device, dtype, batch_size, 1, img)
            runs = {name: _runner(step, plain if name == "plain PyTorch" else fk, batch)
                    for name, step in WAYS.items()}
            results = _measure(device, runs, _cpu_times_ms)
            _record(benchmark, fk, batch, results, config=case, rows=batch_size, dtype="float32", threads=1)
    finally:
        torch.set_num_threads(previous)
    print(f"\n{case}: " + "; ".join(f"{name}: {res['step_ms']:.1f} ms, {res['peak_MiB']:.1f} MiB"
                                     for name, res in results.items()))
