"""The CPU backward hand-off (flowkern/attention/cpu_sdpa_backward.py): where SDPA reads a fused call the same way,
its CPU flash backward gives the reference's gradients; elsewhere the reference backward runs."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flowkern
from flowkern.attention import cpu_sdpa_backward, reference
from flowkern.attention.spec import MASK_BOOL, MASK_NONE, AttentionSpec


def _spec(**kw):
    base = dict(batch=2, q_heads=2, kv_heads=2, seq_q=9, seq_k=9, head_dim=8, head_dim_v=8, is_causal=False,
                causal_offset=0, scale=8 ** -0.5, mask_kind=MASK_NONE, backend="torch")
    return AttentionSpec(**{**base, **kw})


def _rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_flash_backward_equals_the_reference_backward(is_causal, dtype):
    spec = _spec(is_causal=is_causal, seq_q=37, seq_k=37)
    q, k, v, do = (_rand(2, 2, 37, 8, seed=i, dtype=dtype) for i in range(4))
    o, _, stats = reference.attention_fwd(q, k, v, None, None, None, None, spec)
    assert cpu_sdpa_backward.serves(spec, q)
    got = cpu_sdpa_backward.attention_bwd(q, k, v, o, stats, do, spec)
    want = reference.attention_bwd(q, k, v, o, stats, do, None, spec)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("change", [dict(kv_heads=1), dict(mask_kind=MASK_BOOL), dict(head_dim_v=4),
                                    dict(is_causal=True, seq_k=12), dict(is_causal=True, causal_offset=3),
                                    dict(backend="triton")],
                         ids=["gqa", "mask", "ev-ne-e", "causal-rect", "causal-offset", "triton"])
def test_calls_sdpa_reads_differently_keep_the_reference_backward(change):
    assert not cpu_sdpa_backward.serves(_spec(**change), torch.zeros(1))
    assert not cpu_sdpa_backward.serves(_spec(), torch.zeros(1, dtype=torch.bfloat16))


def test_one_pass_gradients_through_a_dual_call_equal_math_sdpa_float64(monkeypatch):
    """The MeanFlow pattern: forward AD open, grad on, backward of O alone (the tangent a constant)."""
    calls = []
    served = cpu_sdpa_backward.attention_bwd
    monkeypatch.setattr(cpu_sdpa_backward, "attention_bwd", lambda *a: calls.append(1) or served(*a))
    q, k, v, q_t, k_t, v_t, do = (_rand(1, 2, 20, 8, seed=10 + i) for i in range(7))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with flowkern.use_backend("torch"), fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(leaves, (q_t, k_t, v_t))]
        out = fwAD.unpack_dual(flowkern.attention(*duals, is_causal=True)).primal
    got = torch.autograd.grad(out, leaves, do)
    assert calls == [1]
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True), ref, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
