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
    kw.setdefault("enable_gqa", True)
    return flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, **kw)


BAD = [
    ("q not a tensor", dict(q=[1.0]), TypeError, "query must be a torch.Tensor"),
    ("q wrong rank", dict(q=torch.randn(16)), ValueError, "query must have at least 2 dimensions"),
    ("k wrong rank", dict(k=torch.randn(16), v=torch.randn(16)), ValueError, "key must have at least 2"),
    ("no head dim with enable_gqa", dict(q=torch.randn(6, 16)), ValueError, "query must have a head dim"),
    ("batch mismatch", dict(q=torch.randn(3, 4, 6, 16), k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16)),
     ValueError, "do not broadcast"),
    ("heads without enable_gqa", dict(enable_gqa=False), ValueError, "leading dims of query, key and value do not"),
    ("head dim mismatch", dict(k=torch.randn(1, 2, 7, 8), v=torch.randn(1, 2, 7, 8)), ValueError, "head dim"),
    ("k/v length mismatch", dict(v=torch.randn(1, 2, 5, 16)), ValueError, r"value must have the sequence length"),
    ("heads not multiple", dict(k=torch.randn(1, 3, 7, 16), v=torch.randn(1, 3, 7, 16)), ValueError,
     "must divide the heads of query"),
    ("mixed dtypes", dict(k=K.double(), v=V.double()), TypeError, "dtype"),
    ("integer dtype", dict(q=torch.ones(1, 4, 6, 16, dtype=torch.int32), q_t=torch.ones(1, 4, 6, 16)), TypeError,
     "query must have dtype"),
    ("tangent shape", dict(q_t=torch.randn(1, 4, 5, 16)), ValueError, r"query_t must have the shape of query"),
    ("tangent dtype", dict(v_t=torch.randn(1, 2, 7, 16, dtype=torch.float64)), TypeError, "value_t has dtype"),
    ("tangent missing", dict(k_t=None, v_t=None, q_t=1.0), TypeError, "query_t must be a torch.Tensor"),
    ("empty sequence", dict(q=torch.randn(1, 4, 0, 16)), ValueError, "empty dimension"),
    ("mask shape", dict(attn_mask=torch.ones(6, 8, dtype=torch.bool)), ValueError, r"attn_mask of shape \(6, 8\)"),
    ("mask rank", dict(attn_mask=torch.ones(1, 1, 1, 6, 7, dtype=torch.bool)), ValueError, "attn_mask of shape"),
    ("mask 1-d", dict(attn_mask=torch.ones(7, dtype=torch.bool)), ValueError, "attn_mask of shape"),
    ("mask dtype", dict(attn_mask=torch.ones(6, 7, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    ("mask float64 for float32", dict(attn_mask=torch.ones(6, 7, dtype=torch.float64)), TypeError,
     "attn_mask must be bool"),
    ("mask not a tensor", dict(attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor"),
    ("scale nan", dict(scale=float("nan")), ValueError, "non-finite scale"),
    ("scale 1-d tensor", dict(scale=torch.tensor([0.5])), TypeError, "scale must be a float or a 0-d tensor"),
    ("scale string", dict(scale="0.5"), TypeError, "scale must be a float"),
    ("causal not bool", dict(is_causal=1), TypeError, "is_causal must be a bool"),
    ("enable_gqa not bool", dict(enable_gqa=1), TypeError, "enable_gqa must be a bool"),
    ("dropout out of range", dict(dropout_p=1.5), ValueError, r"dropout_p must lie in \[0, 1\]"),
    ("dropout", dict(dropout_p=0.1), NotImplementedError, "dropout_p > 0 is not supported"),
]


@pytest.mark.parametrize("kwargs,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_drop_in_validates_too():
    with pytest.raises(ValueError, match="must divide the heads of query"):
        flowkern.attention(Q, torch.randn(1, 3, 7, 16), torch.randn(1, 3, 7, 16), enable_gqa=True)
    with pytest.raises(ValueError, match="do not broadcast"):
        flowkern.attention(Q, torch.randn(1, 3, 7, 16), torch.randn(1, 3, 7, 16))
    with pytest.raises(NotImplementedError, match="dropout_p > 0"):
        flowkern.attention(Q, K, V, None, 0.5, enable_gqa=True)


def test_a_mask_that_requires_grad_is_served_by_sdpa_with_a_warning():
    """SDPA differentiates its additive mask; the fused op treats masks as constants, so such a call is handed to
    SDPA (once warned) and the mask gets SDPA's gradient."""
    import torch.nn.functional as F

    mask = torch.randn(6, 7, requires_grad=True)
    with pytest.warns(UserWarning, match="attn_mask requires grad"):
        out = flowkern.attention(Q, K, V, attn_mask=mask, enable_gqa=True)
    (grad,) = torch.autograd.grad(out.sum(), mask)
    want_mask = mask.detach().requires_grad_()
    (want,) = torch.autograd.grad(F.scaled_dot_product_attention(Q, K, V, attn_mask=want_mask,
                                                                 enable_gqa=True).sum(), want_mask)
    torch.testing.assert_close(grad, want)


def test_a_mask_with_a_tangent_is_served_by_sdpa_with_the_masks_tangent():
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    m, m_t = torch.randn(6, 7), torch.randn(6, 7)
    with fwAD.dual_level():
        with pytest.warns(UserWarning, match="attn_mask carries a forward-mode tangent"):
            got = fwAD.unpack_dual(flowkern.attention(Q, K, V, attn_mask=fwAD.make_dual(m, m_t),
                                                      enable_gqa=True)).tangent
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        _, want = torch.func.jvp(lambda a: F.scaled_dot_product_attention(Q, K, V, attn_mask=a, enable_gqa=True),
                                 (m,), (m_t,))
    torch.testing.assert_close(got, want)


def test_explicit_form_refuses_dual_inputs_with_a_clear_error():
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual_q = fwAD.make_dual(Q, torch.randn_like(Q))
        with pytest.raises(NotImplementedError, match="query carries a forward-mode AD tangent"):
            flowkern.jvp_attention(dual_q, K, V, Q, K, V, enable_gqa=True)


def test_named_backend_that_cannot_serve_raises_naming_the_ones_that_can():
    q, k, v = Q.double(), K.double(), V.double()
    with flowkern.use_backend("triton"), pytest.raises(ValueError, match=r"Backends that can: \['torch'\]"):
        flowkern.jvp_attention(q, k, v, q, k, v, enable_gqa=True)
    with flowkern.use_backend("cuda"), pytest.raises(ValueError, match="has no cuda backend"):
        flowkern.attention(Q, K, V, enable_gqa=True)


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
        flowkern.attention(Q, K, V, enable_gqa=True)
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
        flowkern.attention(Q, K, V, enable_gqa=True)
    assert pushed == []
    setenv("FLOWKERN_NVTX", "1")
    with flowkern.use_backend("torch"):
        flowkern.attention(Q, K, V, enable_gqa=True)
        flowkern.jvp_attention(Q, K, V, Q, K, V, enable_gqa=True)
    assert pushed == ["flowkern.attention", "flowkern.jvp_attention"]


def test_kernels_are_never_a_bare_top_level_module():
    import importlib.util

    import flowkern.kernels.attention.fwd  # noqa: F401

    assert importlib.util.find_spec("kernels") is None or "flowkern" not in str(importlib.util.find_spec("kernels"))
