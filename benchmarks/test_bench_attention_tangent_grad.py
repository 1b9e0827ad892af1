"""The gradient of a scalar function of the attention tangent (reverse over forward, the Lagrangian self-distillation
shape): `torch.func.grad` over `torch.func.jvp` of `flowkern.attention` against the same over math SDPA (the only
stock SDPA backend with a forward-mode rule), measured in the same run.

L = ⟨W, Ȯ⟩ with Ȯ the tangent of attention(q, k, v) along (q̇, k̇, v̇); the gradient is taken w.r.t. all six inputs.
FLOPs counted: 48·B·H·Nq·Nk·D (halved when causal) = the six tile GEMMs of the fused forward with its tangent
(12·…) plus the eighteen of the tangent backward (36·…: eight in the dQ pass, ten in the dK/dV pass,
kernels/attention/tangent_bwd.py); the PyTorch reference's extra μ pass is not counted.

GPU targets: ≥ 3× faster than the math path at N ≥ 2048. CPU: the chunked reference's peak memory at N = 4096 under
1/8 of the math path's (measured in the same run).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_only, requires_cuda

import flowkern
from flowkern._measure import median_time_s, peak_memory_bytes

TANGENT_GRAD_FLOPS_PER_ELEMENT = 48.0  # × B·H·Nq·Nk·D


def tangent_grad_flops(b, h, nq, nk, d, causal=False):
    flops = TANGENT_GRAD_FLOPS_PER_ELEMENT * b * h * nq * nk * d
    return flops / 2 if causal else flops


def _flowkern_attention(causal):
    return lambda q, k, v: flowkern.attention(q, k, v, is_causal=causal)


def _math_attention(causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


IMPLS = {"flowkern": _flowkern_attention, "math_sdpa": _math_attention}


def tangent_gradient(attend, args, weight):
    """∂⟨W, Ȯ⟩/∂(q, k, v, q̇, k̇, v̇) by torch.func.grad over torch.func.jvp."""

    def loss(*a):
        return (torch.func.jvp(attend, a[:3], a[3:])[1] * weight).sum()

    return torch.func.grad(loss, argnums=tuple(range(6)))(*args)


def _inputs(b, h, n, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype) for _ in range(7)]


def _record(benchmark, fn, device, flops):
    seconds = median_time_s(fn, device)
    peak = peak_memory_bytes(fn, device)
    benchmark.extra_info.update({"median_ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                                 "peak_mib": None if peak is None else peak / 2**20})
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


@requires_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("seq", [2048, 4096])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tangent_gradient_gpu(benchmark, device, impl, seq, causal):
    b, h, d = 1, 16, 64
    *args, weight = _inputs(b, h, seq, d, torch.bfloat16, device)
    attend = IMPLS[impl](causal)
    benchmark.group = f"grad of tangent N={seq} {'causal' if causal else 'full'}"
    benchmark.extra_info.update({"shape": [b, h, seq, d], "dtype": "bf16", "causal": causal,
                                 "flops_counted": "48·B·H·Nq·Nk·D (halved when causal)"})
    _record(benchmark, lambda: tangent_gradient(attend, args, weight), device, tangent_grad_flops(b, h, seq, seq, d,
                                                                                                  causal))


@requires_cuda
@pytest.mark.parametrize("seq", [2048])
def test_tangent_gradient_gpu_speedup(device, seq):
    """Both paths in one run: the fused kernels against the math path (target ≥ 3×)."""
    b, h, d = 1, 16, 64
    *args, weight = _inputs(b, h, seq, d, torch.bfloat16, device)
    times = {name: median_time_s(lambda f=make(False): tangent_gradient(f, args, weight), device)
             for name, make in IMPLS.items()}
    flops = tangent_grad_flops(b, h, seq, seq, d)
    print(f"grad of tangent N={seq}: flowkern {times['flowkern'] * 1e3:.2f} ms "
          f"({flops / times['flowkern'] / 1e12:.1f} TFLOP/s), math {times['math_sdpa'] * 1e3:.2f} ms, "
          f"speedup {times['math_sdpa'] / times['flowkern']:.2f}x")


@cpu_only
@pytest.mark.parametrize("impl", list(IMPLS))
def test_tangent_gradient_cpu_memory_at_4096(benchmark, device, impl):
    b, h, n, d = 1, 1, 4096, 64
    *args, weight = _inputs(b, h, n, d, torch.float32, device)
    attend = IMPLS[impl](False)
    fn = lambda: tangent_gradient(attend, args, weight)  # noqa: E731
    peak = peak_memory_bytes(fn, device)
    benchmark.group = "cpu grad of tangent N=4096"
    benchmark.extra_info.update({"shape": [b, h, n, d], "peak_mib": None if peak is None else peak / 2**20})
    benchmark.pedantic(fn, rounds=1, iterations=1)


@cpu_only
def test_tangent_gradient_cpu_memory_under_an_eighth_of_math(device):
    b, h, n, d = 1, 1, 4096, 64
    *args, weight = _inputs(b, h, n, d, torch.float32, device)
    with flowkern.use_backend("torch"):
        ours = peak_memory_bytes(lambda: tangent_gradient(_flowkern_attention(False), args, weight), device)
    theirs = peak_memory_bytes(lambda: tangent_gradient(_math_attention(False), args, weight), device)
    if ours is None or theirs is None:
        pytest.skip("peak memory is not measurable on this platform (/proc/self/clear_refs)")
    print(f"grad of tangent, peak memory N={n}: flowkern reference {ours / 2**20:.1f} MiB, "
          f"math SDPA {theirs / 2**20:.1f} MiB ({theirs / max(ours, 1):.1f}x)")
    assert ours < theirs / 8, f"flowkern {ours / 2**20:.1f} MiB vs math {theirs / 2**20:.1f} MiB"
