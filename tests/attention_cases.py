"""Input builders and tolerances shared by the attention tests."""
from __future__ import annotations

import torch

from flowkern.testing import math_attention

# Error allowed against the float64 reference: max(ABS_FLOOR, RATIO × PyTorch's own error in that dtype).
ABS_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
RATIO = 4.0


def make_inputs(b, hq, hkv, nq, nk, d, dtype=torch.float32, device="cpu", seed=0, layout="contiguous"):
    """q, k, v and their tangents, fresh random values (never zeros). layout='bnhd' makes every tensor a
    transposed view of a [B, N, H, D] buffer (the layout projections produce); 'expanded_tangent' gives k_t a
    stride-0 batch dimension."""
    g = torch.Generator().manual_seed(seed)

    def rand(h, n):
        if layout == "bnhd":
            return torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)

    q, k, v = rand(hq, nq), rand(hkv, nk), rand(hkv, nk)
    q_t, k_t, v_t = rand(hq, nq), rand(hkv, nk), rand(hkv, nk)
    if layout == "expanded_tangent":
        k_t = k_t[:1].expand_as(k)
    return q, k, v, q_t, k_t, v_t


def reference_jvp(q, k, v, q_t, k_t, v_t, **kw):
    """(out, out_t) of torch.func.jvp over float64 math attention."""
    d = [x.double().cpu() for x in (q, k, v, q_t, k_t, v_t)]
    mask = kw.get("attn_mask")
    if mask is not None:
        kw = dict(kw, attn_mask=mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    return torch.func.jvp(lambda a, b_, c: math_attention(a, b_, c, **kw), tuple(d[:3]), tuple(d[3:]))


def reference_grads(q, k, v, grad_out, **kw):
    d = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    mask = kw.get("attn_mask")
    if mask is not None:
        kw = dict(kw, attn_mask=mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    out = math_attention(*d, **kw)
    return torch.autograd.grad(out, d, grad_out.double().cpu())


def torch_own_error(q, k, v, q_t, k_t, v_t, ref, **kw):
    """PyTorch's own error in the inputs' dtype: math attention (and its JVP) computed in that dtype vs float64."""
    if q.dtype in (torch.float32, torch.float64):
        return 0.0, 0.0
    low = torch.func.jvp(lambda a, b_, c: math_attention(a, b_, c, **kw), (q, k, v), (q_t, k_t, v_t))
    return tuple((lo.double().cpu() - r).abs().max().item() for lo, r in zip(low, ref))


def assert_close_to(actual, expected, dtype, torch_err=0.0, what=""):
    err = (actual.double().cpu() - expected).abs().max().item()
    bound = max(ABS_FLOOR[dtype] * max(1.0, expected.abs().max().item()), RATIO * torch_err)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} ({dtype})"
