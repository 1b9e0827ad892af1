"""The Triton attention kernels walk their tiles in two kinds: interior tiles (inside the sequences and, when causal,
wholly on or below the diagonal: no bounds or causal test) and edge tiles (the diagonal band, partial last tiles,
a partial key tile of the dK/dV walk), in loops of their own (`split_tiles()`: Triton >= 3.9, and the plain forward
through descriptors) or every tile as an edge tile in one loop (Triton 3.6): both structures run here, each with every kernel reading its tiles through TMA
descriptors (`tma_loads()`, sm_90; the interpreter emulates them, zero fill past the bounds included) and through
pointers. With the interpreter's 32-query × 16-key tiles these shapes give every kernel both
kinds; each result is checked against float64 math attention: O, Ȯ, the gradients of O (flash backward) and of
(O, Ȯ) (tangent backward)."""
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


@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointers"])
@pytest.mark.parametrize("split", ["1", "0"], ids=["split", "one_loop"])
@pytest.mark.parametrize("nq,nk,causal,mask", CASES,
                         ids=[f"{a}x{b}-{c}{'-mask' if m else ''}" for a, b, c, m in CASES])
def test_interior_and_edge_tiles_match_math_attention(nq, nk, causal, mask, split, tma, monkeypatch):
    monkeypatch.setitem(flowkern._config._env, "split_tiles", split)
    monkeypatch.setitem(flowkern._config._env, "tma", tma)
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


WALKS = ["fwd", "bwd_dq", "bwd_dkdv", "fwd_tangent", "tangent_bwd_dq", "tangent_bwd_dkdv"]


@pytest.mark.parametrize("version,tma,split", [
    ("3.6.0", "1", [True, True, True, True, False, True]),       # kernels/attention/configs.py SPLIT_BEFORE_3_9
    ("3.6.0", "0", [False] * 6),                                  # pointers: one loop on older Triton
    ("3.9.0", "1", [True] * 6), ("3.9.0", "0", [True] * 6)])
def test_auto_walk_per_kernel_follows_the_triton_version_and_the_loads(version, tma, split, monkeypatch):
    """'auto': every walk splits from Triton 3.9 on; before, only the walks of SPLIT_BEFORE_3_9 (head dim 16: the
    64 bucket) and only through descriptors. The results match math attention whichever walk runs."""
    from flowkern.attention import tangent_triton_launch, triton_launch

    monkeypatch.setattr("triton.__version__", version)
    monkeypatch.setitem(flowkern._config._env, "split_tiles", "auto")
    monkeypatch.setitem(flowkern._config._env, "tma", tma)
    seen = {}
    real = triton_launch._walk_flags

    def record(dtype, kernel, head_dim, loads):
        flags = real(dtype, kernel, head_dim, loads)
        seen[kernel] = flags["SPLIT_TILES"]
        return flags

    monkeypatch.setattr(triton_launch, "_walk_flags", record)
    monkeypatch.setattr(tangent_triton_launch, "_walk_flags", record)
    q, k, v, q_t, k_t, v_t = make_inputs(1, 2, 2, 70, 53, 16, seed=3)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, q_t, k_t, v_t)]
    g = torch.randn(1, 2, 70, 16, generator=torch.Generator().manual_seed(4))
    with flowkern.use_backend("triton"):
        out = flowkern.attention(*leaves[:3], is_causal=True)
        torch.autograd.grad(out, leaves[:3], g)
        o, o_t = flowkern.jvp_attention(*leaves, is_causal=True)
        torch.autograd.grad((o_t * g).sum(), leaves)
    assert [seen[w] for w in WALKS] == split, seen
    d = [x.double() for x in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(*d, is_causal=True)
    for got in (out, o):
        assert (got.double() - want).abs().max().item() <= 8 * ABS_FLOOR[torch.float32] * max(1.0, want.abs().max())


@pytest.mark.parametrize("name,make,ready", [
    ("contiguous", lambda: torch.randn(2, 3, 40, 16), True),
    ("bfloat16 rows of 16 bytes", lambda: torch.randn(2, 3, 40, 8, dtype=torch.bfloat16), True),
    ("rows of 12 bytes", lambda: torch.randn(2, 3, 40, 6, dtype=torch.bfloat16), False),
    ("base off by one element", lambda: torch.randn(2 * 3 * 40 * 16 + 1)[1:].view(2, 3, 40, 16), False),
    ("last dim strided", lambda: torch.randn(2, 3, 16, 40).transpose(-1, -2), False),
    ("[B, N, H, D] layout", lambda: torch.randn(2, 40, 3, 16).transpose(1, 2), True),
    ("odd stride of a size-1 dim", lambda: torch.randn(1, 3, 40, 17)[..., :16], False),
    ("odd batch stride, one batch", lambda: torch.randn(3 * 40 * 16 + 4)[:3 * 40 * 16].as_strided(
        (1, 3, 40, 16), (7, 640, 16, 1)), True),
])
def test_tma_descriptors_only_for_tensors_the_copy_engine_can_read(name, make, ready):
    """TMA needs a contiguous last dim, a 16-byte-aligned base and 16-byte multiples for every stride that moves
    between rows or matrices (a size-1 dim's stride never does); anything else is read through pointers."""
    from flowkern.attention.triton_launch import _tma_ready

    assert _tma_ready(make(), None) is ready, name


@pytest.mark.parametrize("layout", ["strided last dim", "misaligned base"])
def test_tensors_tma_cannot_read_still_match_math_attention(layout, monkeypatch):
    """With descriptors forced on, keys and values TMA cannot read go through the pointer path, with the same
    results (float64 math attention)."""
    monkeypatch.setitem(flowkern._config._env, "tma", "1")
    q, k, v, q_t, k_t, v_t = make_inputs(1, 2, 2, 37, 45, 16, seed=5)
    if layout == "strided last dim":
        k, v = (x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (k, v))
    else:
        k, v = (torch.cat([torch.zeros(1), x.flatten()])[1:].view(x.shape) for x in (k, v))
    from flowkern.attention import triton_launch

    ready, seen = triton_launch._tma_ready, []
    monkeypatch.setattr(triton_launch, "_tma_ready", lambda *xs: seen.append(ready(*xs)) or seen[-1])
    with flowkern.use_backend("triton"):
        o, o_t = flowkern.jvp_attention(q, k, v, q_t, k_t, v_t)
    assert seen == [False], seen  # the forward launch took the pointer path
    want_o, want_o_t = reference_jvp(q, k, v, q_t, k_t, v_t)
    for name, got, want in [("O", o, want_o), ("Ȯ", o_t, want_o_t)]:
        bound = 8 * ABS_FLOOR[torch.float32] * max(1.0, want.abs().max().item())
        err = (got.double() - want).abs().max().item()
        assert err <= bound, f"{layout} {name}: max error {err:.3g} > {bound:.3g}"


def test_descriptor_scratch_allocator_is_set_for_the_launch_only(monkeypatch):
    """Device-built descriptors need global scratch from Triton's allocator: flowkern's launch sets one backed by
    torch's allocator and puts the caller's back afterwards; the pointer path and the interpreter leave it alone."""
    from triton.runtime import _allocation

    from flowkern.attention.triton_launch import _descriptor_scratch

    def callers(size, alignment, stream):
        raise AssertionError("the caller's allocator")

    token = _allocation._allocator.set(callers)
    try:
        monkeypatch.setitem(flowkern._config._env, "interpret", False)
        with _descriptor_scratch(torch.device("cpu"), True):
            buffer = _allocation._allocator.get()(4 * 128, 128, None)
            assert buffer.numel() == 512 and buffer.data_ptr() % 128 == 0
        assert _allocation._allocator.get() is callers
        for enabled, interpreting in [(False, False), (True, True)]:
            monkeypatch.setitem(flowkern._config._env, "interpret", interpreting)
            with _descriptor_scratch(torch.device("cpu"), enabled):
                assert _allocation._allocator.get() is callers
    finally:
        _allocation._allocator.reset(token)


def test_descriptor_scratch_without_the_context_variable_uses_the_public_setter(monkeypatch):
    import triton
    from triton.runtime import _allocation

    from flowkern.attention.triton_launch import _ScratchAllocator, _descriptor_scratch

    seen = []
    monkeypatch.setattr(_allocation, "_allocator", None)
    monkeypatch.setattr(triton, "set_allocator", seen.append)
    monkeypatch.setitem(flowkern._config._env, "interpret", False)
    with _descriptor_scratch(torch.device("cpu"), True):
        pass
    assert len(seen) == 1 and isinstance(seen[0], _ScratchAllocator)
