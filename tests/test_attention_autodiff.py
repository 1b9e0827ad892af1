"""flowkern.attention under torch.func.jvp, torch.autograd.forward_ad, gradcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import assert_close_to, make_inputs, reference_jvp, reference_tangent_grads
from conftest import backends_under_test
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowkern
from flowkern.attention import reference, triton_launch
from flowkern.testing import math_attention

BACKENDS = backends_under_test()


@pytest.fixture
def fused_calls(monkeypatch):
    """Records (backend, with_tangent) for every forward kernel pass."""
    calls = []
    for name, module in (("torch", reference), ("triton", triton_launch)):
        original = module.attention_fwd

        def counting(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, args[3] is not None))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "attention_fwd", counting)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_jvp_uses_one_fused_pass(backend, device, fused_calls):
    q, k, v, q_t, k_t, v_t = make_inputs(1, 4, 2, 21, 26, 32, device=device, seed=1)
    with flowkern.use_backend(backend):
        out, out_t = torch.func.jvp(lambda a, b, c: flowkern.attention(a, b, c, is_causal=True, enable_gqa=True), (q, k, v),
                                    (q_t, k_t, v_t))
    assert fused_calls == [(backend, True)], "the JVP must be exactly one fused pass, no separate primal pass"
    ref_out, ref_t = reference_jvp(q, k, v, q_t, k_t, v_t, is_causal=True)
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_with_tangent_on_q_only(backend, device, fused_calls):
    q, k, v, q_t, _, _ = make_inputs(2, 2, 2, 15, 15, 16, device=device, seed=4)
    with fwAD.dual_level(), flowkern.use_backend(backend):
        out = flowkern.attention(fwAD.make_dual(q, q_t), k, v)
        primal, tangent = fwAD.unpack_dual(out)
    assert fused_calls == [(backend, True)]
    zeros = torch.zeros_like(k)
    ref_out, ref_t = reference_jvp(q, k, v, q_t, zeros, zeros)
    assert_close_to(primal, ref_out, torch.float32, what="out")
    assert_close_to(tangent, ref_t, torch.float32, what="out_t")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_forward_runs_no_tangent_work(backend, device, fused_calls):
    q, k, v = make_inputs(1, 2, 2, 8, 8, 16, device=device)[:3]
    with flowkern.use_backend(backend):
        flowkern.attention(q, k, v)
    # the PyTorch backend hands a plain pass to stock SDPA (tests/test_attention.py): no fused call at all
    assert fused_calls == ([] if backend == "torch" else [(backend, False)])
    with flowkern.use_backend(backend):
        flowkern.attention(q, k[:, :1], v[:, :1])   # GQA: always the fused op, without tangent work
    assert fused_calls[-1] == (backend, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meanflow_pattern_jvp_then_grad(backend, device):
    """The pattern every method uses: a no-grad JVP pass for the target, then a grad pass through the same op;
    also torch.func.grad over a function that calls torch.func.jvp (sCM's tangent-in-loss form)."""
    q, k, v, q_t, k_t, v_t = make_inputs(1, 2, 1, 12, 12, 16, device=device, seed=9)
    w = torch.randn(16, 16, device=device, dtype=torch.float64).float()

    def net(x, weight):
        return flowkern.attention(x @ weight, k, v, is_causal=True, enable_gqa=True)

    with flowkern.use_backend(backend):
        with torch.no_grad():
            _, target = torch.func.jvp(lambda x: net(x, w), (q,), (q_t,))
        grad = torch.func.grad(lambda weight: (torch.func.jvp(lambda x: net(x, weight), (q,), (q_t,))[0]
                                               * target).sum())(w)

    def net_ref(x, weight):
        return math_attention(x @ weight, k.double(), v.double(), is_causal=True)

    wd, qd, qtd = w.double(), q.double(), q_t.double()
    _, target_ref = torch.func.jvp(lambda x: net_ref(x, wd), (qd,), (qtd,))
    grad_ref = torch.func.grad(lambda weight: (net_ref(qd, weight) * target_ref).sum())(wd)
    assert_close_to(target, target_ref, torch.float32, what="jvp target")
    assert_close_to(grad, grad_ref, torch.float32, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_through_the_tangent_matches_float64_math(backend, device):
    q, k, v, q_t = make_inputs(1, 2, 2, 6, 6, 16, device=device, seed=3)[:4]
    w = torch.randn(16, 16, device=device)
    wd, qd, kd, vd, qtd = (x.double().cpu() for x in (w, q, k, v, q_t))
    ref_w = torch.func.grad(lambda w: torch.func.jvp(lambda x: math_attention(x @ w, kd, vd), (qd,),
                                                     (qtd,))[1].sum())(wd)
    g_t = torch.randn(q.shape, device=device)
    zeros = torch.zeros_like(q)
    ref_q = reference_tangent_grads(q, k, v, q_t, zeros, zeros, None, g_t)[0]
    with flowkern.use_backend(backend):
        grad_w = torch.func.grad(lambda w: torch.func.jvp(lambda x: flowkern.attention(x @ w, k, v), (q,),
                                                          (q_t,))[1].sum())(w)
        assert_close_to(grad_w, ref_w, torch.float32, what="torch.func.grad over torch.func.jvp")
        qg = q.clone().requires_grad_()
        with fwAD.dual_level():
            out = flowkern.attention(fwAD.make_dual(qg, q_t), k, v)
            primal, tangent = fwAD.unpack_dual(out)
            (tangent * g_t).sum().backward(retain_graph=True)
            assert_close_to(qg.grad, ref_q, torch.float32, what="forward_ad tangent, backward")
            qg.grad = None
            primal.sum().backward()
        assert torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_jvp_and_jacfwd(backend, device):
    """torch.func.vmap folds the vmapped dimension into the batch (one kernel launch for all of it)."""
    q, k, v = make_inputs(2, 2, 1, 5, 7, 16, device=device, seed=8)[:3]
    mask = (torch.rand(2, 2, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3).to(device)
    probes = torch.randn(3, *q.shape, generator=torch.Generator().manual_seed(2)).to(device)
    for kw in ({"is_causal": True}, {"attn_mask": mask}):
        with flowkern.use_backend(backend):
            got = torch.func.vmap(lambda t: torch.func.jvp(lambda x: flowkern.attention(x, k, v, enable_gqa=True, **kw), (q,),
                                                           (t,))[1])(probes)
            batched = torch.func.vmap(lambda x: flowkern.attention(x, k, v, enable_gqa=True, **kw))(torch.stack([q, 2 * q]))
        want = torch.stack([reference_jvp(q, k, v, t, torch.zeros_like(k), torch.zeros_like(v), **kw)[1]
                            for t in probes])
        assert_close_to(got, want, torch.float32, what="vmap(jvp)")
        assert_close_to(batched[1], reference_jvp(2 * q, k, v, q, k, v, **kw)[0], torch.float32, what="vmap")
    q1, k1, v1 = (x[:1, :1, :3].double() for x in (q, k, v))
    with flowkern.use_backend("torch"):
        jac = torch.func.jacfwd(lambda x: flowkern.attention(x, k1, v1))(q1)
    torch.testing.assert_close(jac, torch.func.jacfwd(lambda x: math_attention(x, k1, v1))(q1))


def test_gradcheck_with_forward_ad_on_the_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(1, 2, 5, 6, generator=g) > 0.3
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask, "scale": 0.7}):
        assert torch.autograd.gradcheck(lambda a, b, c: flowkern.reference.attention(a, b, c, enable_gqa=True, **kwargs), (q, k, v),
                                        check_forward_ad=True, check_backward_ad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_torch_compile_the_tangent_is_never_silently_wrong(backend, device, fused_calls):
    """Dynamo drops custom forward-AD rules, so the op runs eagerly inside compiled code (a graph break):
    forward, backward, torch.func.jvp(compiled) and dual inputs all get the fused results; fullgraph refuses."""
    torch._dynamo.reset()
    q, k, v, q_t, k_t, v_t = make_inputs(1, 2, 2, 9, 9, 16, device=device, seed=12)

    def f(a, b, c):
        return flowkern.attention(a, b, c) * 2.0

    compiled = torch.compile(f, backend="aot_eager")
    ref_out, ref_t = reference_jvp(q, k, v, q_t, k_t, v_t)
    with flowkern.use_backend(backend):
        out, out_t = torch.func.jvp(compiled, (q, k, v), (q_t, k_t, v_t))
        assert_close_to(out, 2 * ref_out, torch.float32, what="out")
        assert_close_to(out_t, 2 * ref_t, torch.float32, what="out_t")
        with fwAD.dual_level():
            dual_out = compiled(fwAD.make_dual(q, q_t), fwAD.make_dual(k, k_t), fwAD.make_dual(v, v_t))
            assert_close_to(fwAD.unpack_dual(dual_out).tangent, 2 * ref_t, torch.float32, what="dual out_t")
        qg = q.clone().requires_grad_()
        compiled(qg, k, v).sum().backward()
        assert torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0
        torch._dynamo.reset()
        with pytest.raises(Exception, match="disable|compiled frames"):
            torch.compile(lambda a, b, c: flowkern.attention(a, b, c) + 1.0, backend="aot_eager",
                          fullgraph=True)(q, k, v)
    assert all(with_tangent for _, with_tangent in fused_calls[:2])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hkv=st.integers(1, 2), group=st.integers(1, 3), nq=st.integers(1, 40), nk=st.integers(1, 40),
       head_dim=st.sampled_from([8, 16, 24, 48]), causal=st.booleans(),
       mask=st.sampled_from([None, "bool", "additive"]), seed=st.integers(0, 2**16))
def test_hypothesis_shapes_and_masks(backend, device, hkv, group, nq, nk, head_dim, causal, mask, seed):
    inputs = make_inputs(1, hkv * group, hkv, nq, nk, head_dim, device=device, seed=seed)
    attn_mask = None
    if mask is not None:
        g = torch.Generator().manual_seed(seed)
        keep = torch.rand(1, 1, nq, nk, generator=g) > 0.3
        attn_mask = keep if mask == "bool" else torch.randn(1, 1, nq, nk, generator=g).masked_fill(~keep, -torch.inf)
        attn_mask = attn_mask.to(device)
    with flowkern.use_backend(backend):
        out, out_t = flowkern.jvp_attention(*inputs, is_causal=causal, attn_mask=attn_mask, enable_gqa=True)
    ref_out, ref_t = reference_jvp(*inputs, is_causal=causal, attn_mask=attn_mask)
    assert torch.isfinite(out).all() and torch.isfinite(out_t).all()
    assert_close_to(out, ref_out, torch.float32, what="out")
    assert_close_to(out_t, ref_t, torch.float32, what="out_t")
