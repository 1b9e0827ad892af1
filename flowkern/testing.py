"""Independent references for tests and benchmarks (plain PyTorch, no flowkern code)."""
from __future__ import annotations

import torch


def math_attention(q, k, v, *, causal=False, attn_mask=None, scale=None):
    """Textbook softmax attention with an explicit [B, H, Nq, Nk] score matrix (O(N²) memory).

    Same semantics as `F.scaled_dot_product_attention` with the math backend (top-left causal alignment, bool masks
    keep True, additive masks are added after scaling, GQA by repeating k/v), except that a row with every key
    removed gives 0 instead of NaN. Differentiable in both modes (`torch.func.jvp`, autograd).
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    empty = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(torch.where(empty, 0.0, s), dim=-1)
    return torch.where(empty, 0.0, p) @ v
