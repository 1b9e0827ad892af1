"""Inputs where a softmax-attention kernel easily returns a wrong number: padding masks of huge finite values, huge
logits, low-precision tangents, NaN keys. Each case against SDPA's math backend (float64 unless said)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_RUNS, backends_under_test
from torch.nn.attention import SDPBackend, sdpa_kernel

import flowkern
from flowkern.testing import math_attention

BACKENDS = backends_under_test()


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def math_sdpa(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _all_results(fn, q, k, v, tangents, grad_out):
    """(out, out_t, dq, dk, dv) of fn."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    _, out_t = torch.func.jvp(fn, (q, k, v), tangents)
    return (out.detach(), out_t, *grads)


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", ["finfo.min", -1e9, -1e6])
def test_rows_padded_with_a_huge_finite_value_are_sdpas_uniform_average(backend, fill):
    """The padding style of Hugging Face models: every key of a query row masked with a huge finite value. SDPA then
    averages the values uniformly, with P = 1/Nk in the gradients and the tangent. (Query rows of zeros make c·QKᵀ
    exact, so the float32 kernel and float64 SDPA see the same scores.)"""
    dtype = _dtype(backend)
    b, h, nq, nk, d = 1, 2, 5, 3, 16
    q, k, v = _rand(b, h, nq, d, seed=1), _rand(b, h, nk, d, seed=2), _rand(b, h, nk, d, seed=3)
    q[:, :, 1] = 0.0
    value = torch.finfo(dtype).min if fill == "finfo.min" else fill
    mask = torch.zeros(nq, nk, dtype=torch.float64)
    mask[1] = value  # row 1: every key masked
    mask[3, 0] = value  # row 3: one key masked
    tangents = tuple(_rand(*x.shape, seed=10 + i) for i, x in enumerate((q, k, v)))
    grad_out = _rand(b, h, nq, d, seed=20)
    with flowkern.use_backend(backend):
        got = _all_results(lambda a, b_, c: flowkern.attention(a, b_, c, attn_mask=mask.to(dtype)),
                           *(x.to(dtype) for x in (q, k, v)), tuple(t.to(dtype) for t in tangents), grad_out.to(dtype))
    want = _all_results(lambda a, b_, c: math_sdpa(a, b_, c, attn_mask=mask), q, k, v, tangents, grad_out)
    torch.testing.assert_close(want[0][:, :, 1], v.mean(2))  # the reference itself: the uniform average
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    for name, g, w in zip(("out", "out_t", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# Unmasked, the PyTorch backend hands the call to SDPA's own CPU kernels; the Triton kernels run their interior tiles.
_HUGE_LOGIT_CASES = [pytest.param(b.values[0], True, id=f"{b.id}-mask", marks=b.marks) for b in BACKENDS] + [
    pytest.param("triton", False, id="triton-no_mask", marks=b.marks) for b in BACKENDS if b.values[0] == "triton"]


@pytest.mark.parametrize("backend,masked", _HUGE_LOGIT_CASES)
@pytest.mark.parametrize("scale", [-1e4, 1e4])
def test_huge_logits_give_sdpas_vanishing_gradients(backend, masked, scale):
    """scale = ±1e4 makes P one-hot: the output is one value row, dq, dk and the tangent's Ṗ part are
    below 1e-30. dP − Δ must cancel exactly (Δ = Σ P dP, not dO·O), or c = 1e4 amplifies a rounding into 1e-2; and
    S − m must be exactly 0 at the max (c·QKᵀ rounded before m is subtracted, never one FMA), on the kernels'
    unmasked interior tiles as on the masked ones."""
    dtype = _dtype(backend)
    # 37 keys: two whole key tiles of the interpreter's 16-key config, then a partial edge tile
    q, k, v = _rand(1, 2, 6, 8, seed=4), _rand(1, 2, 37, 8, seed=7), _rand(1, 2, 37, 8, seed=6)
    tangents = tuple(_rand(*x.shape, seed=30 + i) for i, x in enumerate((q, k, v)))
    grad_out = _rand(1, 2, 6, 8, seed=40)
    keep = torch.ones(6, 37, dtype=torch.bool) if masked else None  # a mask keeps the PyTorch backend fused
    with flowkern.use_backend(backend):
        got = _all_results(lambda a, b_, c: flowkern.attention(a, b_, c, attn_mask=keep, scale=scale),
                           *(x.to(dtype) for x in (q, k, v)), tuple(t.to(dtype) for t in tangents), grad_out.to(dtype))
    want = _all_results(lambda a, b_, c: math_sdpa(a, b_, c, scale=scale), q, k, v, tangents, grad_out)
    assert max(w.abs().max().item() for w in want[2:4]) < 1e-30  # dq, dk vanish
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for name, g, w in zip(("out", "out_t", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_leading_key_tiles_all_masked_then_very_negative_logits(backend, kind):
    """Every row's first key tiles (keys 0..19, more than the interpreter's 16-key tile) are removed by the mask and
    its kept logits lie near −200, −80, −30: the running max must stay −∞ over the removed tiles, not a stand-in 0
    (exp(−200 − 0) underflows: the row would come out empty, O = 0)."""
    dtype = _dtype(backend)
    nq, nk, d = 4, 45, 8
    q = _rand(1, 2, nq, d, seed=50)
    q = q / q.norm(dim=-1, keepdim=True)
    direction = q[:, :, :1] / q[:, :, :1].norm(dim=-1, keepdim=True)
    k = -200.0 * direction.expand(1, 2, nk, d) + 0.5 * _rand(1, 2, nk, d, seed=51)
    v = _rand(1, 2, nk, d, seed=52)
    keep = torch.ones(nq, nk, dtype=torch.bool)
    keep[:, :20] = False
    mask = keep if kind == "bool" else torch.zeros(nq, nk, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    tangents = tuple(_rand(*x.shape, seed=53 + i) for i, x in enumerate((q, k, v)))
    grad_out = _rand(1, 2, nq, d, seed=56)
    scores = (q @ k.transpose(-1, -2))[..., 20:]
    assert scores[0, 0, 0].max() < -150  # the reference case: a row whose kept logits all underflow exp(s − 0)
    with flowkern.use_backend(backend):
        got = _all_results(lambda a, b_, c: flowkern.attention(a, b_, c, attn_mask=mask if kind == "bool"
                                                               else mask.to(dtype), scale=1.0),
                           *(x.to(dtype) for x in (q, k, v)), tuple(t.to(dtype) for t in tangents), grad_out.to(dtype))
    want = _all_results(lambda a, b_, c: math_sdpa(a, b_, c, attn_mask=mask, scale=1.0), q, k, v, tangents, grad_out)
    tol = 2e-4 if dtype == torch.float32 else 1e-10   # |k| ≈ 200: float32 scores carry ~1e-5 absolute error
    for name, g, w in zip(("out", "out_t", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _gpu_like_math_jvp(inputs, dtype, **kw):
    """torch.func.jvp of textbook math attention run in `dtype` on CPU: every matmul takes `dtype` operands,
    accumulates in float32 and rounds its result to `dtype`, as the math SDPA JVP does on a GPU."""
    low = [x.to(dtype) for x in inputs]
    return torch.func.jvp(lambda a, b, c: math_attention(a, b, c, **kw), tuple(low[:3]), tuple(low[3:]))


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="Triton runs neither on a GPU nor in its interpreter here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seed", [0, 1])
def test_low_precision_tangent_within_twice_a_gpu_like_math_jvp(dtype, is_causal, seed):
    """flash-attention's rule for a low-precision kernel: at most 2x the error (against float64) of the math
    implementation in the same dtype. The tangent is where a fused kernel loses most: p̃⊙Ṡ rounded before its GEMM,
    and T̃/l − μ·O cancelling; the kernel centres Ṡ on the running μ instead."""
    shape = [(1, 2, 48, 32)] * 6
    inputs = [_rand(*s, seed=seed * 10 + i).float() for i, s in enumerate(shape)]
    ref = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, is_causal=is_causal),
                         tuple(x.double() for x in inputs[:3]), tuple(x.double() for x in inputs[3:]))
    theirs = _gpu_like_math_jvp(inputs, dtype, is_causal=is_causal)
    with flowkern.use_backend("triton"):
        ours = flowkern.jvp_attention(*(x.to(dtype) for x in inputs), is_causal=is_causal)
    for name, o, t, r in zip(("out", "out_t"), ours, theirs, ref):
        err, their_err = ((x.double() - r).abs().max().item() for x in (o, t))
        assert err <= 2.0 * their_err, f"{name}: error {err:.3g} > 2 x {their_err:.3g} (math JVP in {dtype})"


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="Triton runs neither on a GPU nor in its interpreter here")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_bf16_tangent_with_a_large_row_mean_stays_at_the_math_jvps_error(is_causal):
    """Keys sharing a large component (16·u) give each row of Ṡ a large mean μᵢ, which the softmax tangent removes.
    Accumulated as T̃ = Σ p̃Ṡ v and corrected at the end by T̃/l − μ·O, the two terms cancel: the uncentred kernel
    reached 1.9× the bf16 math JVP's error here with is_causal (0.99× without). Centred on the running μ, the kernel
    stays at or below the math JVP's own error (0.43–0.48×)."""
    shape = (1, 2, 48, 32)
    worst = 0.0
    for seed in range(3):
        q, k, v, q_t, k_t, v_t = (_rand(*shape, seed=10 * seed + i) for i in range(6))
        inputs = [q, k + 16.0 * _rand(1, 2, 1, 32, seed=99 + seed), v, 3.0 * q_t, k_t, v_t]
        ref = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, is_causal=is_causal), tuple(inputs[:3]),
                             tuple(inputs[3:]))[1]
        theirs = _gpu_like_math_jvp(inputs, torch.bfloat16, is_causal=is_causal)[1]
        with flowkern.use_backend("triton"):
            ours = flowkern.jvp_attention(*(x.to(torch.bfloat16) for x in inputs), is_causal=is_causal)[1]
        err, their_err = ((x.double() - ref).abs().max().item() for x in (ours, theirs))
        worst = max(worst, err / their_err)
    assert worst <= 1.0, f"tangent error {worst:.2f}× the bf16 math JVP's"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "additive", "causal"])
def test_a_nan_key_masked_out_everywhere_poisons_every_result_as_in_sdpa(backend, kind):
    """SDPA adds the mask to the scores: a NaN score stays NaN under −inf, so a NaN in a key makes the output, the
    tangent and every gradient NaN even where every query masks that key. flowkern gives the same, consistently
    (never a finite output with a NaN tangent)."""
    dtype = _dtype(backend)
    q, k, v = _rand(1, 1, 4, 8, seed=1), _rand(1, 1, 5, 8, seed=2), _rand(1, 1, 5, 8, seed=3)
    nan_key = 4 if kind == "causal" else 2  # causal: key 4 is seen by no query (top-left, 4 queries)
    k[0, 0, nan_key, 3] = float("nan")
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[:, nan_key] = False
    kwargs = {"is_causal": True} if kind == "causal" else {
        "attn_mask": keep if kind == "bool" else torch.zeros(4, 5, dtype=torch.float64).masked_fill(~keep, -torch.inf)}
    tangents = tuple(_rand(*x.shape, seed=50 + i) for i, x in enumerate((q, k, v)))
    grad_out = _rand(1, 1, 4, 8, seed=60)
    want = _all_results(lambda a, b_, c: math_sdpa(a, b_, c, **kwargs), q, k, v, tangents, grad_out)
    low_kwargs = {n: (m.to(dtype) if m.is_floating_point() else m) if isinstance(m, torch.Tensor) else m
                  for n, m in kwargs.items()}
    with flowkern.use_backend(backend):
        got = _all_results(lambda a, b_, c: flowkern.attention(a, b_, c, **low_kwargs),
                           *(x.to(dtype) for x in (q, k, v)), tuple(t.to(dtype) for t in tangents), grad_out.to(dtype))
    for name, g, w in zip(("out", "out_t", "dq", "dk", "dv"), got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{name}: NaN pattern differs from SDPA's"
