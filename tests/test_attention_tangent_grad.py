"""Reverse over forward through attention: gradients of (O, Ȯ) with respect to q, k, v, q̇, k̇, v̇ against float64
`torch.func.grad` over `torch.func.jvp` of math attention, for the PyTorch reference (float64 and float32) and the
Triton kernels (kernels/attention/tangent_bwd.py, in the interpreter without a GPU) per dtype; GQA/MQA, cross
attention, causal, bool/additive masks (fully-masked rows), head dims 72/96/256, the drop-in and explicit forms."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowkern
from flowkern.attention import tangent_backward
from flowkern.attention.spec import AttentionSpec, MASK_NONE
from conftest import DEVICE, TRITON_RUNS, backends_under_test
from helpers import ABS_FLOOR, make_inputs, reference_tangent_grads

BACKENDS = backends_under_test()
NAMES = ("q", "k", "v", "q_t", "k_t", "v_t")
# gradients of the tangent go through a few more roundings than O and Ȯ: a wider floor than the forward's
GRAD_FLOOR = {dtype: 8 * floor for dtype, floor in ABS_FLOOR.items()}


def _mask(kind, b, hq, nq, nk, seed, *, empty_row=None):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        mask = torch.rand(b, 1, nq, nk, generator=g) > 0.3
        mask[..., 0] = True
        if empty_row is not None:
            mask[..., empty_row, :] = False
        return mask
    mask = torch.randn(b, hq, nq, nk, generator=g)
    mask[torch.rand(b, hq, nq, nk, generator=g) < 0.2] = float("-inf")
    mask[..., 0] = 0.0
    if empty_row is not None:
        mask[..., empty_row, :] = float("-inf")
    return mask


def _check(grads, ref, dtype, what):
    for name, a, r in zip(NAMES, grads, ref):
        assert a is not None, f"{what}: no gradient for {name}"
        assert a.dtype == dtype, f"{what}: gradient of {name} has dtype {a.dtype}"
        err = (a.double().cpu() - r).abs().max().item()
        bound = GRAD_FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{what}: gradient of {name}: max error {err:.3g} > {bound:.3g} ({dtype})"


def _explicit_grads(backend, inputs, g, g_t, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with flowkern.use_backend(backend):
        out, out_t = flowkern.jvp_attention(*leaves, **kw)
        ((out * g.to(out.dtype)).sum() + (out_t * g_t.to(out.dtype)).sum()).backward()
    return [leaf.grad for leaf in leaves]


def _case(b, hq, hkv, nq, nk, d, causal, mask_kind, seed, dtype=torch.float32, empty_row=None):
    inputs = make_inputs(b, hq, hkv, nq, nk, d, dtype=dtype, device=DEVICE, seed=seed)
    kw = {"is_causal": causal, "enable_gqa": hq != hkv}
    mask = _mask(mask_kind, b, hq, nq, nk, seed, empty_row=empty_row)
    if mask is not None:
        kw["attn_mask"] = (mask if mask.dtype == torch.bool else mask.to(dtype)).to(DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    g, g_t = (torch.randn(b, hq, nq, d, generator=gen) for _ in range(2))
    return inputs, kw, g.to(DEVICE), g_t.to(DEVICE)


SHAPES = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]), st.integers(1, 19),
                   st.integers(1, 19), st.sampled_from([8, 16]), st.booleans(), st.sampled_from([None, "bool", "add"]))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=SHAPES, seed=st.integers(0, 1000))
def test_reference_float64_matches_math_attention(shape, seed):
    b, (hq, hkv), nq, nk, d, causal, mask_kind = shape
    inputs, kw, g, g_t = _case(b, hq, hkv, nq, nk, d, causal, mask_kind, seed, dtype=torch.float64)
    ref = reference_tangent_grads(*inputs, g, g_t, **kw)
    _check(_explicit_grads("torch", inputs, g, g_t, **kw), ref, torch.float64, f"reference {shape}")


@pytest.mark.interpreter
@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=SHAPES, seed=st.integers(0, 1000))
def test_triton_matches_math_attention(shape, seed):
    b, (hq, hkv), nq, nk, d, causal, mask_kind = shape
    inputs, kw, g, g_t = _case(b, hq, hkv, nq, nk, d, causal, mask_kind, seed)
    ref = reference_tangent_grads(*inputs, g, g_t, **kw)
    _check(_explicit_grads("triton", inputs, g, g_t, **kw), ref, torch.float32, f"triton {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_with_float32_accumulation(backend, dtype):
    inputs, kw, g, g_t = _case(1, 4, 2, 13, 11, 16, True, "add", 5, dtype=dtype)
    ref = reference_tangent_grads(*inputs, g, g_t, **kw)
    _check(_explicit_grads(backend, inputs, g, g_t, **kw), ref, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [72, 96, 256])
def test_head_dims_that_are_not_powers_of_two_and_the_largest(backend, d):
    inputs, kw, g, g_t = _case(1, 2, 1, 5, 4, d, False, "bool", d)
    ref = reference_tangent_grads(*inputs, g, g_t, **kw)
    _check(_explicit_grads(backend, inputs, g, g_t, **kw), ref, torch.float32, f"{backend} head dim {d}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool", "add"])
def test_fully_masked_rows_give_zero_gradients(backend, mask_kind):
    inputs, kw, g, g_t = _case(1, 2, 1, 6, 7, 8, False, mask_kind, 11, empty_row=2)
    grads = _explicit_grads(backend, inputs, g, g_t, **kw)
    assert all(torch.isfinite(x).all() for x in grads)
    for name in ("q", "q_t"):
        row = grads[NAMES.index(name)][:, :, 2]
        assert torch.equal(row, torch.zeros_like(row)), f"gradient of {name} on a fully masked row"
    # the masked row sends nothing to k, v: the same gradients with its cotangents zeroed
    g0, gt0 = g.clone(), g_t.clone()
    g0[:, :, 2] = 7.0
    gt0[:, :, 2] = -3.0
    again = _explicit_grads(backend, inputs, g0, gt0, **kw)
    for name in ("k", "v", "k_t", "v_t"):
        i = NAMES.index(name)
        torch.testing.assert_close(again[i], grads[i], rtol=0, atol=0, msg=f"{name} depends on a masked row")
    _check(grads, reference_tangent_grads(*inputs, g, g_t, **kw), torch.float32, f"{backend} masked rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_form_under_func_grad_over_func_jvp(backend):
    """Only Ȯ is differentiated (no cotangent of O): the kernels' HAS_DO=False path."""
    inputs, kw, _, g_t = _case(2, 4, 1, 9, 12, 16, True, None, 3)
    ref = reference_tangent_grads(*inputs, None, g_t, **kw)

    def loss(*a):
        return (torch.func.jvp(lambda x, y, z: flowkern.attention(x, y, z, **kw), a[:3], a[3:])[1] * g_t).sum()

    with flowkern.use_backend(backend):
        grads = torch.func.grad(loss, argnums=tuple(range(6)))(*inputs)
    _check(grads, ref, torch.float32, f"{backend} drop-in")


def test_gradcheck_of_the_reference():
    inputs, kw, _, _ = _case(1, 2, 1, 4, 5, 8, True, "add", 2, dtype=torch.float64)
    leaves = tuple(x.detach().clone().requires_grad_() for x in inputs)
    with flowkern.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: flowkern.jvp_attention(*a, **kw), leaves)


def test_reference_chunks_agree():
    """The chunked walk over the keys gives the same result whatever the chunk (a chunk smaller than Nk)."""
    q, k, v, q_t, k_t, v_t = make_inputs(1, 2, 1, 7, 9, 8, dtype=torch.float64, seed=4)
    spec = AttentionSpec(1, 2, 1, 7, 9, 8, 8, False, 0, 8 ** -0.5, MASK_NONE, "torch")
    with flowkern.use_backend("torch"):
        o, o_t = flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, enable_gqa=True)
    from flowkern.attention import reference

    stats = reference.attention_fwd(q, k, v, None, None, None, None, spec)[2]
    g, g_t = torch.randn_like(o), torch.randn_like(o)
    one = tangent_backward.attention_tangent_bwd(q, k, v, q_t, k_t, v_t, o, o_t, stats, g, g_t, None, spec, chunk=2)
    full = tangent_backward.attention_tangent_bwd(q, k, v, q_t, k_t, v_t, o, o_t, stats, g, g_t, None, spec, chunk=64)
    for a, b_ in zip(one, full):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_head_dim_and_bottom_right_causal(backend):
    """Ev ≠ E and `causal_lower_right` (keys j ≤ i + Nk − Nq) in the backward through the tangent."""
    from torch.nn.attention.bias import causal_lower_right

    dtype = torch.float64 if backend == "torch" else torch.float32
    gen = torch.Generator().manual_seed(11)
    nq, nk, e, ev = 5, 9, 8, 16
    shapes = [(1, 2, nq, e), (1, 2, nk, e), (1, 2, nk, ev)]
    inputs = [torch.randn(s, generator=gen, dtype=dtype).to(DEVICE) for s in shapes * 2]
    g, g_t = (torch.randn(1, 2, nq, ev, generator=gen).to(DEVICE) for _ in range(2))
    keep = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    ref = reference_tangent_grads(*inputs, g, g_t, attn_mask=keep)
    got = _explicit_grads(backend, inputs, g, g_t, attn_mask=causal_lower_right(nq, nk))
    _check(got, ref, dtype, f"{backend} Ev != E, lower-right causal")
