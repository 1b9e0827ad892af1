"""flowkern.patch_sdpa(): F.scaled_dot_product_attention routed to flowkern.attention inside unmodified code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import flowkern
from flowkern.attention import SDPA_PATCH, api


class SelfAttention(nn.Module):
    """Attention written against SDPA, as third-party models are (the function looked up at call time)."""

    def __init__(self, dim=16, heads=2, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _model():
    torch.manual_seed(0)
    return SelfAttention().double().eval()


def test_jvp_through_an_unmodified_module_uses_the_fused_op_and_matches_math_sdpa():
    model = _model()
    x, x_t = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        want = torch.func.jvp(model, (x,), (x_t,))
    with flowkern.patch_sdpa() as counts:
        counts.reset()
        assert F.scaled_dot_product_attention is not api.STOCK_SDPA
        got = torch.func.jvp(model, (x,), (x_t,))
        assert (counts.fused, counts.fallback) == (1, 0)
    assert F.scaled_dot_product_attention is api.STOCK_SDPA  # restored on exit
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_install_and_uninstall_nest_and_restore_pytorchs_function():
    stock = F.scaled_dot_product_attention
    flowkern.patch_sdpa.install()
    try:
        with flowkern.patch_sdpa():
            assert flowkern.patch_sdpa.installed()
        assert flowkern.patch_sdpa.installed(), "the inner block must not undo the outer install"
    finally:
        flowkern.patch_sdpa.uninstall()
    assert F.scaled_dot_product_attention is stock and not flowkern.patch_sdpa.installed()
    with pytest.raises(RuntimeError, match="not installed"):
        flowkern.patch_sdpa.uninstall()


def test_calls_flowkern_cannot_serve_fall_through_to_sdpa_with_one_warning():
    """dropout_p > 0 keeps SDPA's meaning (its own dropout), with a one-time warning saying why, and is counted."""
    model = _model()
    model.dropout = 0.5
    model.train()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    api._warned_fallback.clear()
    with flowkern.patch_sdpa() as counts:
        counts.reset()
        with pytest.warns(UserWarning, match="dropout_p > 0"):
            torch.manual_seed(3)
            got = model(x)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call does not warn again
            model(x)
        assert (counts.fused, counts.fallback) == (0, 2)
        assert counts.reasons == {"dropout_p > 0 (no dropout inside the fused kernels)": 2}
    torch.manual_seed(3)
    torch.testing.assert_close(got, model(x))  # SDPA itself, same random stream


def test_empty_inputs_and_a_grad_requiring_mask_fall_through_counted():
    q = torch.randn(1, 2, 0, 8)
    k = v = torch.randn(1, 2, 4, 8)
    api._warned_fallback.clear()
    with flowkern.patch_sdpa() as counts, pytest.warns(UserWarning):
        counts.reset()
        out = F.scaled_dot_product_attention(q, k, v)
        mask = torch.zeros(3, 4, requires_grad=True)
        F.scaled_dot_product_attention(torch.randn(1, 2, 3, 8), k, v, attn_mask=mask).sum().backward()
        assert (counts.fused, counts.fallback) == (0, 2)
    assert out.shape == (1, 2, 0, 8) and mask.grad is not None


def test_sdpas_errors_stay_errors_naming_the_argument():
    with flowkern.patch_sdpa(), pytest.raises(ValueError, match="must divide the heads of query"):
        F.scaled_dot_product_attention(torch.randn(1, 4, 3, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8),
                                       enable_gqa=True)


def test_the_patch_is_an_nvtx_range(monkeypatch, setenv):
    import nvtx

    pushed = []
    monkeypatch.setattr(nvtx, "push_range", lambda name, **kw: pushed.append(name))
    monkeypatch.setattr(nvtx, "pop_range", lambda **kw: None)
    setenv("FLOWKERN_NVTX", "1")
    q = torch.randn(1, 2, 3, 8)
    with flowkern.patch_sdpa(), flowkern.use_backend("torch"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    assert pushed == ["flowkern.patch_sdpa", "flowkern.attention"]


def test_causal_bias_through_the_patch_is_the_causal_mask():
    """A CausalBias dispatches SDPA calls through its own __torch_function__; patched, flowkern reads it as the
    causal mask it describes (never as the unfilled tensor it is)."""
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (4, 7, 7))
    bias = causal_lower_right(4, 7)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias._materialize())
    with flowkern.patch_sdpa() as counts:
        counts.reset()
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        assert counts.fused == 1
    torch.testing.assert_close(got, want)
