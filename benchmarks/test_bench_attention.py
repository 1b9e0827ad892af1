"""flowkern.jvp_attention against the stock ways of getting an attention JVP.

Baselines (measured in the same run): `torch.func.jvp` over math SDPA (the only stock SDPA backend with forward
AD), and the PyPI package `jvp-flash-attention` where installed. Derived figures go to `benchmark.extra_info`:
TFLOP/s counting 12·B·H·Nq·Nk·D for forward + tangent (and 12 + 10 = 22·… with the primal backward: 4 GEMMs of the
flash backward counted as 2.5× the forward's 2), and peak memory in MiB.

GPU targets (H100/H200, bf16, B=1, H=32, N=8192, D=64, non-causal): forward + tangent ≥ 500 TFLOP/s; ≥ 4× faster
than math JVP at N ≥ 2048; ≥ 1.2× faster than jvp-flash-attention. CPU: the reference's peak memory at N=4096 under
1/8 of math JVP's.
"""
from __future__ import annotations

import pytest
import torch
from conftest import cpu_only, requires_cuda

import flowkern
from flowkern._measure import attention_jvp_flops, median_time_s, peak_memory_bytes
from flowkern.baselines import jvp_flash_attention_available, jvp_flash_attention_jvp, math_sdpa_jvp

FWD_BWD_FLOP_FACTOR = 22.0 / 12.0


def _inputs(b, h, n, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype) for _ in range(6)]


def _flowkern_jvp(q, k, v, q_t, k_t, v_t, is_causal=False):
    return flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1])


IMPLS = {
    "flowkern": _flowkern_jvp,
    "math_sdpa_jvp": math_sdpa_jvp,
    "jvp_flash_attention": jvp_flash_attention_jvp,
}


def _record(benchmark, fn, device, flops):
    seconds = median_time_s(fn, device)
    peak = peak_memory_bytes(fn, device)
    benchmark.extra_info.update({
        "median_ms": seconds * 1e3,
        "tflops": flops / seconds / 1e12,
        "peak_mib": None if peak is None else peak / 2**20,
    })
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


@requires_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("seq", [2048, 4096, 8192])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_tangent(benchmark, device, impl, seq, causal):
    if impl == "jvp_flash_attention" and not jvp_flash_attention_available():
        pytest.skip("jvp-flash-attention is not installed")
    b, h, d = 1, 32, 64
    if impl == "math_sdpa_jvp" and seq > 4096:
        pytest.skip("math JVP at N=8192, H=32 needs several 4 GiB score tensors: measured at N <= 4096")
    args = _inputs(b, h, seq, d, torch.bfloat16, device)
    benchmark.group = f"fwd+tangent N={seq} {'causal' if causal else 'full'}"
    benchmark.extra_info.update({"shape": [b, h, seq, d], "dtype": "bf16", "causal": causal})
    _record(benchmark, lambda: IMPLS[impl](*args, is_causal=causal), device,
            attention_jvp_flops(b, h, seq, seq, d, causal))


@requires_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("seq", [2048, 4096])
def test_forward_tangent_and_primal_backward(benchmark, device, impl, seq):
    """The MeanFlow step shape: the JVP pass plus the backward of the primal output."""
    if impl == "jvp_flash_attention" and not jvp_flash_attention_available():
        pytest.skip("jvp-flash-attention is not installed")
    b, h, d = 1, 32, 64
    q, k, v, q_t, k_t, v_t = _inputs(b, h, seq, d, torch.bfloat16, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grad = torch.randn_like(q)

    def step():
        out, _ = IMPLS[impl](q, k, v, q_t, k_t, v_t)
        out.backward(grad)

    benchmark.group = f"fwd+tangent+bwd N={seq}"
    benchmark.extra_info.update({"shape": [b, h, seq, d], "dtype": "bf16"})
    _record(benchmark, step, device, attention_jvp_flops(b, h, seq, seq, d) * FWD_BWD_FLOP_FACTOR)


@cpu_only
@pytest.mark.parametrize("impl", ["flowkern_reference", "math_sdpa_jvp"])
def test_cpu_reference_memory_at_4096(benchmark, device, impl):
    """The chunked reference keeps O(N·chunk) per head where math JVP keeps several N×N tensors."""
    b, h, n, d = 1, 1, 4096, 64
    args = _inputs(b, h, n, d, torch.float32, device)
    fn = (lambda: flowkern.reference.jvp_attention(*args)) if impl == "flowkern_reference" else (
        lambda: math_sdpa_jvp(*args))
    peak = peak_memory_bytes(fn, device)
    benchmark.group = "cpu peak memory N=4096"
    benchmark.extra_info.update({"shape": [b, h, n, d], "peak_mib": None if peak is None else peak / 2**20})
    benchmark.pedantic(fn, rounds=1, iterations=1)


@cpu_only
def test_cpu_reference_uses_under_an_eighth_of_math_jvp_memory(device):
    b, h, n, d = 1, 1, 4096, 64
    args = _inputs(b, h, n, d, torch.float32, device)
    ours = peak_memory_bytes(lambda: flowkern.reference.jvp_attention(*args), device)
    theirs = peak_memory_bytes(lambda: math_sdpa_jvp(*args), device)
    if ours is None or theirs is None:
        pytest.skip("peak memory is not measurable on this platform (/proc/self/clear_refs)")
    print(f"peak memory N={n}: reference {ours / 2**20:.1f} MiB, math JVP {theirs / 2**20:.1f} MiB")
    assert ours < theirs / 8, f"reference {ours / 2**20:.1f} MiB vs math JVP {theirs / 2**20:.1f} MiB"
