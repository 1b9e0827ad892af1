"""Bad inputs fail with a ValueError/TypeError naming the argument; backend selection rules."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern._dispatch import select_backend

Q = torch.randn(1, 4, 6, 16)
K = torch.randn(1, 2, 7, 16)
V = torch.randn(1, 2, 7, 16)


def call(q=Q, k=K, v=V, q_t=None, k_t=None, v_t=None, **kw):
    q_t = torch.randn_like(q) if q_t is None and isinstance(q, torch.Tensor) else q_t
    k_t = torch.randn_like(k) if k_t is None and isinstance(k, torch.Tensor) else k_t
    v_t = torch.randn_like(v) if v_t is None and isinstance(v, torch.Tensor) else v_t
    return flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, **kw)


BAD = [
    ("q not a tensor", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q wrong rank", dict(q=torch.randn(4, 6, 16)), ValueError, "q must have 4 dimensions"),
    ("k wrong rank", dict(k=torch.randn(2, 7, 16), v=torch.randn(2, 7, 16)), ValueError, "k must have 4"),
    ("batch mismatch", dict(k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16)), ValueError, "batch size"),
    ("head dim mismatch", dict(k=torch.randn(1, 2, 7, 8), v=torch.randn(1, 2, 7, 8)), ValueError, "head dim"),
    ("k/v shape mismatch", dict(v=torch.randn(1, 2, 5, 16)), ValueError, r"k and v must have one shape"),
    ("heads not multiple", dict(k=torch.randn(1, 3, 7, 16), v=torch.randn(1, 3, 7, 16)), ValueError, "multiple"),
    ("mixed dtypes", dict(k=K.double(), v=V.double()), TypeError, "dtype"),
    ("integer dtype", dict(q=torch.ones(1, 4, 6, 16, dtype=torch.int32), q_t=torch.ones(1, 4, 6, 16)), TypeError,
     "q must have dtype"),
    ("tangent shape", dict(q_t=torch.randn(1, 4, 5, 16)), ValueError, r"q_t must have the shape of q"),
    ("tangent dtype", dict(v_t=torch.randn(1, 2, 7, 16, dtype=torch.float64)), TypeError, "v_t has dtype"),
    ("tangent missing", dict(k_t=None, v_t=None, q_t=1.0), TypeError, "q_t must be a torch.Tensor"),
    ("empty sequence", dict(q=torch.randn(1, 4, 0, 16)), ValueError, "no empty dimension"),
    ("mask shape", dict(attn_mask=torch.ones(6, 8, dtype=torch.bool)), ValueError, r"attn_mask of shape \(6, 8\)"),
    ("mask rank", dict(attn_mask=torch.ones(1, 1, 1, 6, 7, dtype=torch.bool)), ValueError, "attn_mask of shape"),
    ("mask dtype", dict(attn_mask=torch.ones(6, 7, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale must be finite"),
    ("scale tensor", dict(scale=torch.tensor(0.5)), TypeError, "scale must be a real number"),
    ("causal not bool", dict(causal=1), TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize("kwargs,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_drop_in_validates_too():
    with pytest.raises(ValueError, match="multiple"):
        flowkern.attention(Q, torch.randn(1, 3, 7, 16), torch.randn(1, 3, 7, 16))
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        flowkern.attention(Q, K, V, attn_mask=torch.zeros(6, 7, requires_grad=True))


def test_mask_with_a_tangent_is_refused():
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        mask = fwAD.make_dual(torch.zeros(6, 7), torch.ones(6, 7))
        with pytest.raises(ValueError, match="attn_mask carries a forward-mode tangent"):
            flowkern.attention(Q, K, V, attn_mask=mask)


def test_explicit_form_refuses_dual_inputs_with_a_clear_error():
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual_q = fwAD.make_dual(Q, torch.randn_like(Q))
        with pytest.raises(NotImplementedError, match="q carries a forward-mode AD tangent"):
            flowkern.jvp_attention(dual_q, K, V, Q, K, V)


def test_named_backend_that_cannot_serve_raises_naming_the_ones_that_can():
    q, k, v = Q.double(), K.double(), V.double()
    with flowkern.use_backend("triton"), pytest.raises(ValueError, match=r"Backends that can: \['torch'\]"):
        flowkern.jvp_attention(q, k, v, q, k, v)
    with flowkern.use_backend("cuda"), pytest.raises(ValueError, match="has no cuda backend"):
        flowkern.attention(Q, K, V)


def test_head_dim_over_256_runs_on_the_reference_and_is_refused_by_name_on_triton():
    q, k = torch.randn(1, 1, 3, 264), torch.randn(1, 1, 4, 264)
    with flowkern.use_backend("torch"):
        out, out_t = flowkern.jvp_attention(q, k, k, q, k, k)
    assert out.shape == (1, 1, 3, 264) and torch.isfinite(out_t).all()
    with flowkern.use_backend("triton"), pytest.raises(ValueError, match="head dims up to 256"):
        flowkern.jvp_attention(q, k, k, q, k, k)


def test_auto_never_fails_for_lack_of_a_backend(setenv):
    setenv("FLOWKERN_BACKEND", "auto")
    assert select_backend("op", torch.device("cpu"), torch.float64) == "torch"
    setenv("TRITON_INTERPRET", "0")
    assert select_backend("op", torch.device("cpu"), torch.float32) == "torch"
    setenv("TRITON_INTERPRET", "1")
    assert select_backend("op", torch.device("cpu"), torch.float32) == "triton"


def test_unknown_backend_name_is_refused(setenv):
    setenv("FLOWKERN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FLOWKERN_BACKEND='tpu'"):
        flowkern.attention(Q, K, V)
    with pytest.raises(ValueError, match="backend must be one of"):
        with flowkern.use_backend("fast"):
            pass


def test_nvtx_ranges_are_pushed_only_when_enabled(monkeypatch, setenv):
    nvtx = pytest.importorskip("nvtx")

    pushed = []
    monkeypatch.setattr(nvtx, "push_range", lambda name, **kw: pushed.append(name))
    monkeypatch.setattr(nvtx, "pop_range", lambda **kw: None)
    setenv("FLOWKERN_NVTX", "0")
    with flowkern.use_backend("torch"):
        flowkern.attention(Q, K, V)
    assert pushed == []
    setenv("FLOWKERN_NVTX", "1")
    with flowkern.use_backend("torch"):
        flowkern.attention(Q, K, V)
        flowkern.jvp_attention(Q, K, V, Q, K, V)
    assert pushed == ["flowkern.attention", "flowkern.jvp_attention"]


def test_kernels_are_never_a_bare_top_level_module():
    import importlib.util

    import flowkern.kernels.attention.fwd  # noqa: F401

    assert importlib.util.find_spec("kernels") is None or "flowkern" not in str(importlib.util.find_spec("kernels"))
