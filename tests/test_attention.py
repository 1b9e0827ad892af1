"""flowkern.jvp_attention / flowkern.attention against torch.func.jvp of a float64 math attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (assert_close_to, make_inputs, reference_grads, reference_jvp, reference_tangent_grads,
                     torch_own_error)
from conftest import backends_under_test

import flowkern

BACKENDS = backends_under_test()

# (B, Hq, Hkv, Nq, Nk, D): odd lengths, one-element sequences, cross-attention both ways, GQA and MQA.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 2, 2, 37, 45, 24),
    (1, 4, 2, 50, 19, 32),
    (1, 3, 1, 17, 70, 40),
    (2, 2, 1, 33, 33, 64),
]


def _run(backend, *args, **kw):
    with flowkern.use_backend(backend):
        return flowkern.jvp_attention(*args, enable_gqa=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_output_tangent_and_grads_match_float64_math(backend, shape, causal, device):
    inputs = make_inputs(*shape, device=device, seed=hash((shape, causal)) % 1000)
    out, out_t = _run(backend, *inputs, is_causal=causal)
    ref_out, ref_t = reference_jvp(*inputs, is_causal=causal)
    assert out.shape == ref_out.shape and out.dtype == torch.float32 and out_t.dtype == torch.float32
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")

    q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
    with flowkern.use_backend(backend):
        out = flowkern.attention(q, k, v, enable_gqa=True, is_causal=causal)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), reference_grads(*inputs[:3], grad_out, is_causal=causal)):
        assert_close_to(got, want, torch.float32, what=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 72, 96, 128, 256])
def test_head_dims(backend, head_dim, device):
    inputs = make_inputs(1, 2, 1, 9, 21, head_dim, device=device, seed=head_dim)
    out, out_t = _run(backend, *inputs, is_causal=True)
    ref_out, ref_t = reference_jvp(*inputs, is_causal=True)
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision_within_a_multiple_of_pytorchs_own_error(backend, dtype, causal, device):
    inputs = make_inputs(1, 2, 1, 41, 29, 32, dtype=dtype, device=device, seed=7)
    out, out_t = _run(backend, *inputs, is_causal=causal)
    assert out.dtype == dtype and out_t.dtype == dtype, "outputs and tangents come back in the input dtype"
    ref = reference_jvp(*inputs, is_causal=causal)
    err_out, err_t = torch_own_error(*inputs, ref, is_causal=causal)
    assert_close_to(out, ref[0], dtype, err_out, what="out")
    assert_close_to(out_t, ref[1], dtype, err_t, what="out_t")

    q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
    with flowkern.use_backend(backend):
        out = flowkern.attention(q, k, v, enable_gqa=True, is_causal=causal)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_grads = reference_grads(*inputs[:3], grad_out, is_causal=causal)
    low = [x.detach().clone().requires_grad_() for x in inputs[:3]]
    from flowkern.testing import math_attention
    own = torch.autograd.grad(math_attention(*low, is_causal=causal), low, grad_out)
    for name, got, want, theirs in zip("qkv", (q.grad, k.grad, v.grad), ref_grads, own):
        assert got.dtype == dtype
        assert_close_to(got, want, dtype, (theirs.double().cpu() - want).abs().max().item(), what=f"d{name}")


@pytest.mark.parametrize("nq,nk", [(5, 12), (12, 5), (8, 8)])
def test_causal_alignment_is_that_of_stock_sdpa(nq, nk):
    """is_causal in SDPA is top-left aligned (query i sees keys j <= i) also when Nq != Nk."""
    q, k, v = make_inputs(1, 2, 2, nq, nk, 16, dtype=torch.float64, seed=nq * nk)[:3]
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = flowkern.attention(q, k, v, enable_gqa=True, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _masks(b, h, nq, nk, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, h, nq, nk, generator=g) > 0.4
    additive = torch.randn(b, h, nq, nk, generator=g)
    additive = additive.masked_fill(torch.rand(b, h, nq, nk, generator=g) > 0.7, float("-inf"))
    return {
        "bool_full": keep,
        "bool_2d": keep[0, 0],
        "bool_key_padding": keep[:, :1, :1, :],
        "additive_with_-inf": additive,
        "additive_head_broadcast": additive[:, :1],
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_name", list(_masks(1, 1, 2, 2, 0)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masks(backend, mask_name, causal, device):
    b, hq, hkv, nq, nk, d = 2, 2, 1, 19, 23, 16
    inputs = make_inputs(b, hq, hkv, nq, nk, d, device=device, seed=3)
    mask = _masks(b, hq, nq, nk, seed=5)[mask_name].to(device)
    out, out_t = _run(backend, *inputs, is_causal=causal, attn_mask=mask)
    ref_out, ref_t = reference_jvp(*inputs, is_causal=causal, attn_mask=mask)
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")
    q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
    with flowkern.use_backend(backend):
        out = flowkern.attention(q, k, v, enable_gqa=True, is_causal=causal, attn_mask=mask)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref = reference_grads(*inputs[:3], grad_out, is_causal=causal, attn_mask=mask)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), ref):
        assert_close_to(got, want, torch.float32, what=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_give_zero_output_tangent_and_gradient(backend, kind, device):
    b, h, nq, nk, d = 1, 2, 6, 9, 16
    inputs = make_inputs(b, h, h, nq, nk, d, device=device, seed=11)
    keep = torch.ones(b, h, nq, nk, dtype=torch.bool)
    keep[:, 0, 2] = False  # row 2 of head 0 sees no key
    keep[:, 1, 4:] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    mask = mask.to(device)
    out, out_t = _run(backend, *inputs, attn_mask=mask)
    assert torch.isfinite(out).all() and torch.isfinite(out_t).all()
    assert (out[:, 0, 2] == 0).all() and (out_t[:, 0, 2] == 0).all()
    assert (out[:, 1, 4:] == 0).all() and (out_t[:, 1, 4:] == 0).all()
    ref_out, ref_t = reference_jvp(*inputs, attn_mask=mask)
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")
    q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
    with flowkern.use_backend(backend):
        flowkern.attention(q, k, v, enable_gqa=True, attn_mask=mask).backward(torch.randn(out.shape, device=device))
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
    assert (q.grad[:, 0, 2] == 0).all() and (q.grad[:, 1, 4:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bnhd", "expanded_tangent"])
def test_non_contiguous_inputs(backend, layout, device):
    inputs = make_inputs(2, 4, 2, 13, 18, 24, device=device, seed=5, layout=layout)
    assert not all(x.is_contiguous() for x in inputs)
    out, out_t = _run(backend, *inputs, is_causal=True)
    ref_out, ref_t = reference_jvp(*inputs, is_causal=True)
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_argument(backend, device):
    inputs = make_inputs(1, 2, 2, 11, 13, 32, device=device, seed=2)
    out, out_t = _run(backend, *inputs, scale=0.37)
    ref_out, ref_t = reference_jvp(*inputs, scale=0.37)
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backprop_through_the_tangent(backend, device):
    inputs = [x.requires_grad_() for x in make_inputs(1, 1, 1, 4, 5, 16, device=device)]
    out, out_t = _run(backend, *inputs)
    (out + out_t).sum().backward()
    ones = torch.ones(1, 1, 4, 16)
    for x, ref, what in zip(inputs, reference_tangent_grads(*inputs, ones, ones), ("q", "k", "v", "q_t", "k_t", "v_t")):
        assert_close_to(x.grad, ref, torch.float32, what=f"gradient of {what}")
    for x in inputs:
        x.grad = None
    out, out_t = _run(backend, *inputs)
    out.sum().backward()  # through out alone, the tangent inputs get no gradient
    assert inputs[0].grad is not None and inputs[3].grad is None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_walks_several_key_chunks(causal, monkeypatch):
    """The PyTorch reference's online softmax across chunks (the tests' other shapes fit in one chunk)."""
    from flowkern.attention import reference

    monkeypatch.setattr(reference, "KEY_CHUNK", 8)
    inputs = make_inputs(1, 2, 1, 21, 30, 16, seed=21)
    mask = torch.rand(1, 2, 21, 30, generator=torch.Generator().manual_seed(3)) > 0.3
    out, out_t = _run("torch", *inputs, is_causal=causal, attn_mask=mask)
    ref_out, ref_t = reference_jvp(*inputs, is_causal=causal, attn_mask=mask)
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")
    q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
    with flowkern.use_backend("torch"):
        out = flowkern.attention(q, k, v, enable_gqa=True, is_causal=causal, attn_mask=mask)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad),
                               reference_grads(*inputs[:3], grad_out, is_causal=causal, attn_mask=mask)):
        assert_close_to(got, want, torch.float32, what=f"d{name}")


def test_plain_pass_on_the_pytorch_backend_is_stock_sdpa(monkeypatch):
    """Without a mask, GQA or a possible tangent, the PyTorch backend hands the call to SDPA's native kernel (same
    values and gradients as the float64 math reference); under forward AD the fused tangent path runs instead."""
    import torch.autograd.forward_ad as fwAD

    from flowkern.attention import api

    calls = []
    real = api.STOCK_SDPA  # PyTorch's SDPA, as flowkern holds it (unaffected by flowkern.patch_sdpa)
    monkeypatch.setattr(api, "STOCK_SDPA", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v, q_t, k_t, v_t = (x.double().requires_grad_() for x in make_inputs(2, 2, 2, 7, 7, 8, seed=3))
    with flowkern.use_backend("torch"):
        out = flowkern.attention(q, k, v, enable_gqa=True, is_causal=True)
        assert calls == [1]
        out.sum().backward()
        with fwAD.dual_level():
            flowkern.attention(fwAD.make_dual(q.detach(), q_t.detach()), k.detach(), v.detach(), is_causal=True)
        assert calls == [1]
        flowkern.attention(q, k[:, :1], v[:, :1])   # GQA: the fused path
        assert calls == [1]
    from flowkern.testing import math_attention

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    ref = math_attention(*leaves, is_causal=True)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip((q.grad, k.grad, v.grad), (x.grad for x in leaves)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
