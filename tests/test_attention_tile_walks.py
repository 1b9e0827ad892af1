"""The Triton attention kernels walk their tiles in two kinds: interior tiles (inside the sequences and, when causal,
wholly on or below the diagonal: no bounds or causal test) and edge tiles (the diagonal band, partial last tiles,
a partial key tile of the dK/dV walk), in loops of their own (`split_tiles()`, Triton >= 3.9) or every tile as an
edge tile in one loop (Triton 3.6): both structures run here. With the interpreter's 32-query × 16-key tiles these
shapes give every kernel both kinds; each result is checked against float64 math attention: O, Ȯ, the gradients of
O (flash backward) and of (O, Ȯ) (tangent backward)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

import flowkern
import flowkern._config
from conftest import TRITON_RUNS
from helpers import ABS_FLOOR, make_inputs, reference_jvp, reference_tangent_grads

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")]

# (seq_q, seq_k, causal, bool mask): causal "upper" is SDPA's is_causal (top-left), "lower" a bottom-right CausalBias
CASES = [(70, 53, None, False), (70, 53, "upper", False), (53, 70, "upper", False), (64, 64, "upper", False),
         (70, 53, "lower", False), (53, 70, "lower", False), (70, 53, None, True), (53, 70, None, True)]


def _kw(causal, nq, nk, mask, *, dense=False):
    if causal == "lower":
        bias = causal_lower_right(nq, nk)
        return {"attn_mask": bias._materialize() if dense else bias}
    kw = {"is_causal": causal == "upper", "enable_gqa": True}
    if mask:
        keep = torch.rand(nq, nk, generator=torch.Generator().manual_seed(9)) > 0.3
        keep[:, 0] = True
        kw["attn_mask"] = keep
    return kw


@pytest.mark.parametrize("split", ["1", "0"], ids=["split", "one_loop"])
@pytest.mark.parametrize("nq,nk,causal,mask", CASES,
                         ids=[f"{a}x{b}-{c}{'-mask' if m else ''}" for a, b, c, m in CASES])
def test_interior_and_edge_tiles_match_math_attention(nq, nk, causal, mask, split, monkeypatch):
    monkeypatch.setitem(flowkern._config._env, "split_tiles", split)
    hq, hkv = (2, 1) if causal != "lower" else (2, 2)  # GQA where SDPA's math backend takes it
    q, k, v, q_t, k_t, v_t = make_inputs(2, hq, hkv, nq, nk, 16, seed=nq + nk)
    kw = _kw(causal, nq, nk, mask)
    gen = torch.Generator().manual_seed(1)
    g, g_t = (torch.randn(2, hq, nq, 16, generator=gen) for _ in range(2))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with flowkern.use_backend("triton"):
        out = flowkern.attention(*leaves, **kw)
        plain_grads = torch.autograd.grad(out, leaves, g)
        tangent_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, q_t, k_t, v_t)]
        o, o_t = flowkern.jvp_attention(*tangent_leaves, **kw)
        tangent_grads = torch.autograd.grad((o * g).sum() + (o_t * g_t).sum(), tangent_leaves)

    dense = _kw(causal, nq, nk, mask, dense=True)
    d = [x.double() for x in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        want_o = F.scaled_dot_product_attention(*d, **dense)
        want_plain = torch.autograd.grad(
            F.scaled_dot_product_attention(*[x.requires_grad_() for x in d], **dense), d, g.double())
    want_o_t = reference_jvp(q, k, v, q_t, k_t, v_t, **dense)[1]
    want_tangent = reference_tangent_grads(q, k, v, q_t, k_t, v_t, g, g_t, **dense)
    floor = ABS_FLOOR[torch.float32]
    for name, got, want in [("O", out, want_o), ("Ȯ", o_t, want_o_t), *zip(("dq", "dk", "dv"), plain_grads, want_plain),
                            *zip(("tangent dq", "dk", "dv", "dq_t", "dk_t", "dv_t"), tangent_grads, want_tangent)]:
        bound = 8 * floor * max(1.0, want.abs().max().item())
        err = (got.double() - want).abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
