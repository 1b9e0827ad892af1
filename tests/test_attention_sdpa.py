"""flowkern.attention as a drop-in for F.scaled_dot_product_attention: its signature and semantics, against
SDPA's math backend in float64 (outputs, gradients and forward-mode tangents)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import backends_under_test
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import flowkern

BACKENDS = backends_under_test()


def _rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def math_sdpa(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _compare(backend, q, k, v, args=(), dtype=torch.float64, tol=1e-9, **kwargs):
    """Output, gradients and tangent of flowkern.attention(q, k, v, *args, **kwargs) on `backend` (inputs cast to
    `dtype`) against float64 math SDPA."""
    tangents = tuple(_rand(*x.shape, seed=100 + i) for i, x in enumerate((q, k, v)))
    low_args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with flowkern.use_backend(backend):
        low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = flowkern.attention(*low, *low_args, **kwargs)
        grad_out = _rand(*out.shape, seed=7)
        grads = torch.autograd.grad(out, low, grad_out.to(dtype))
        _, out_t = torch.func.jvp(lambda a, b, c: flowkern.attention(a, b, c, *low_args, **kwargs),
                                  tuple(x.to(dtype) for x in (q, k, v)), tuple(t.to(dtype) for t in tangents))
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = math_sdpa(*ref_in, *args, **kwargs)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    _, ref_t = torch.func.jvp(lambda a, b, c: math_sdpa(a, b, c, *args, **kwargs), (q, k, v), tangents)
    assert out.shape == ref.shape and out.dtype == dtype
    for name, got, want in [("out", out, ref), ("out_t", out_t, ref_t)] + list(zip(("dq", "dk", "dv"), grads,
                                                                                   ref_grads)):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _tol(backend):
    return 2e-5 if backend == "triton" else 1e-9


# (query, key, value shapes, kwargs): SDPA's shape rules
SHAPE_CASES = {
    "2d": ((5, 8), (6, 8), (6, 8), {}),
    "3d": ((3, 5, 8), (3, 6, 8), (3, 6, 8), {}),
    "5d": ((2, 2, 3, 5, 8), (2, 2, 3, 6, 8), (2, 2, 3, 6, 8), {}),
    "3d_query_4d_kv": ((3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}),
    "kv_broadcast_over_heads": ((2, 3, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), {}),
    "batch_broadcast": ((1, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}),
    "value_head_dim_wider": ((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 12), {}),
    "value_head_dim_narrower": ((2, 2, 5, 16), (2, 2, 6, 16), (2, 2, 6, 4), {}),
    "gqa": ((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), {"enable_gqa": True}),
    "gqa_3d": ((4, 5, 8), (2, 6, 8), (2, 6, 8), {"enable_gqa": True}),
    "gqa_key_value_heads_differ": ((1, 4, 5, 8), (1, 2, 6, 8), (1, 1, 6, 8), {"enable_gqa": True}),
    "gqa_causal_5d": ((2, 1, 4, 5, 8), (2, 1, 2, 6, 8), (2, 1, 2, 6, 8), {"enable_gqa": True, "is_causal": True}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_shapes_follow_sdpa(backend, case):
    qs, ks, vs, kwargs = SHAPE_CASES[case]
    q, k, v = _rand(*qs, seed=1), _rand(*ks, seed=2), _rand(*vs, seed=3)
    _compare(backend, q, k, v, dtype=_dtype(backend), tol=_tol(backend), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positional_and_keyword_arguments_as_sdpa(backend):
    q, k, v = _rand(1, 2, 5, 8, seed=1), _rand(1, 2, 7, 8, seed=2), _rand(1, 2, 7, 8, seed=3)
    mask = _rand(5, 7, seed=4)
    dtype = _dtype(backend)
    _compare(backend, q, k, v, (mask, 0.0, False), dtype=dtype, tol=_tol(backend), scale=0.3)
    _compare(backend, q, k, v, (None, 0.0, True), dtype=dtype, tol=_tol(backend))
    with flowkern.use_backend(backend):
        by_name = flowkern.attention(query=q.to(dtype), key=k.to(dtype), value=v.to(dtype), attn_mask=mask.to(dtype),
                                     dropout_p=0.0, is_causal=False, scale=torch.tensor(0.3), enable_gqa=False)
    torch.testing.assert_close(by_name.double(), math_sdpa(q, k, v, mask, 0.0, False, scale=float(torch.tensor(0.3))),
                               rtol=_tol(backend), atol=_tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", ["upper_left", "lower_right"])
@pytest.mark.parametrize("lengths", [(5, 9), (9, 5), (6, 6)], ids=lambda s: f"L{s[0]}S{s[1]}")
def test_causal_bias_objects(backend, bias, lengths):
    """A CausalBias is a tensor subclass whose storage is never filled: it must be read as the causal mask it
    describes (lower-right: query i sees keys j <= i + S - L), never as an additive tensor."""
    seq_q, seq_k = lengths
    q, k, v = _rand(2, 2, seq_q, 8, seed=1), _rand(2, 2, seq_k, 8, seed=2), _rand(2, 2, seq_k, 8, seed=3)
    make = causal_upper_left if bias == "upper_left" else causal_lower_right
    dense = make(seq_q, seq_k)._materialize()
    with flowkern.use_backend(backend):
        got = flowkern.attention(q.to(_dtype(backend)), k.to(_dtype(backend)), v.to(_dtype(backend)),
                                 attn_mask=make(seq_q, seq_k))
    torch.testing.assert_close(got.double(), math_sdpa(q, k, v, attn_mask=dense), rtol=_tol(backend),
                               atol=_tol(backend))
    _compare(backend, q, k, v, dtype=_dtype(backend), tol=_tol(backend), attn_mask=make(seq_q, seq_k))
    with pytest.raises(ValueError, match="CausalBias"):
        flowkern.attention(q, k, v, attn_mask=make(seq_q, seq_k), is_causal=True)
    with pytest.raises(ValueError, match="CausalBias for"):
        flowkern.attention(q, k, v, attn_mask=make(seq_q + 1, seq_k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_masks_in_float32_or_the_query_dtype(backend):
    q = _rand(1, 2, 5, 8, seed=1, dtype=torch.bfloat16)
    k, v = (_rand(1, 2, 6, 8, seed=s, dtype=torch.bfloat16) for s in (2, 3))
    mask32 = _rand(5, 6, seed=4, dtype=torch.float32)
    with flowkern.use_backend(backend):
        for mask in (mask32, mask32.bfloat16()):
            got = flowkern.attention(q, k, v, attn_mask=mask)
            assert got.dtype == torch.bfloat16
            want = math_sdpa(q.double(), k.double(), v.double(), attn_mask=mask.double())
            torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_empty_inputs_give_sdpas_empty_and_zero_results():
    """SDPA returns empty tensors for empty dims (and zeros for S = 0): flowkern hands those calls to SDPA."""
    q, k, v = _rand(2, 2, 5, 8, seed=1), _rand(2, 2, 6, 8, seed=2), _rand(2, 2, 6, 8, seed=3)
    for args in [(q[:0], k[:0], v[:0]), (q[:, :, :0], k, v), (q, k[:, :, :0], v[:, :, :0]), (q, k, v[..., :0])]:
        with pytest.warns(UserWarning, match="empty dimension"):
            from flowkern.attention import api

            api._warned_fallback.clear()
            got = flowkern.attention(*args)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_gives_the_autocast_dtype_like_sdpa(backend):
    q, k, v = (_rand(1, 2, 5, 8, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16), flowkern.use_backend(backend):
        want = F.scaled_dot_product_attention(q, k, v)
        got = flowkern.attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = flowkern.attention(q.double(), k.double(), v.double())
    assert got.dtype == want.dtype == torch.bfloat16
    assert kept.dtype == torch.float64  # as SDPA: autocast leaves float64 alone
    torch.testing.assert_close(got.double(), math_sdpa(q.double(), k.double(), v.double()), rtol=2e-2, atol=2e-2)


def test_a_zero_dim_tensor_scale_is_a_float_scale():
    q, k, v = _rand(1, 2, 5, 8, seed=1), _rand(1, 2, 6, 8, seed=2), _rand(1, 2, 6, 8, seed=3)
    torch.testing.assert_close(flowkern.attention(q, k, v, scale=torch.tensor(0.25)),
                               math_sdpa(q, k, v, scale=0.25))


def test_a_non_finite_scale_is_served_by_sdpa_with_a_warning():
    from flowkern.attention import api

    api._warned_fallback.clear()
    q, k, v = _rand(1, 1, 3, 8, seed=1), _rand(1, 1, 4, 8, seed=2), _rand(1, 1, 4, 8, seed=3)
    with pytest.warns(UserWarning, match="non-finite scale"):
        got = flowkern.attention(q, k, v, scale=float("nan"))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, scale=float("nan")), equal_nan=True)
