"""`attn_mask` as SDPA reads it: a `CausalBias` object, a bool mask (True keeps a score) or an additive float mask.

`resolve_mask` validates the mask against the call's score shape [..., L, S] and returns what the kernels take:
a tensor mask (or None) plus the causal flag and offset (a `causal_upper_left` bias is SDPA's `is_causal`, offset 0;
`causal_lower_right` aligns the diagonal to the bottom-right corner, offset S − L). A `CausalBias` is a tensor
subclass whose storage is never filled, so it must never be read as a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention.bias import CausalBias, CausalVariant

from flowkern._autograd import requires_grad
from flowkern.attention.spec import MASK_ADDITIVE, MASK_BOOL, MASK_NONE


@dataclass(frozen=True)
class ResolvedMask:
    mask: torch.Tensor | None
    kind: int
    is_causal: bool
    causal_offset: int
    unservable: str | None = None  # why the fused op cannot take this mask (SDPA can): None when it can


def _causal_bias(bias: CausalBias, is_causal: bool, seq_q: int, seq_k: int) -> ResolvedMask:
    if is_causal:
        raise ValueError("attn_mask is a CausalBias and is_causal=True: pass one of them (SDPA refuses both)")
    if (bias.seq_len_q, bias.seq_len_kv) != (seq_q, seq_k):
        raise ValueError(f"attn_mask is a CausalBias for (L, S) = ({bias.seq_len_q}, {bias.seq_len_kv}) but query "
                         f"and key have (L, S) = ({seq_q}, {seq_k})")
    offset = 0 if bias.variant == CausalVariant.UPPER_LEFT else seq_k - seq_q
    return ResolvedMask(None, MASK_NONE, True, offset)


def resolve_mask(attn_mask, is_causal: bool, query: torch.Tensor, score_shape: tuple) -> ResolvedMask:
    """Validate `attn_mask` for scores of shape `score_shape` = (*lead, L, S); see the module docstring."""
    seq_q, seq_k = score_shape[-2:]
    if attn_mask is None:
        return ResolvedMask(None, MASK_NONE, is_causal, 0)
    if isinstance(attn_mask, CausalBias):
        return _causal_bias(attn_mask, is_causal, seq_q, seq_k)
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, a CausalBias or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        kind = MASK_BOOL
    elif attn_mask.dtype in (torch.float32, query.dtype) and attn_mask.is_floating_point():
        kind = MASK_ADDITIVE
    else:
        raise TypeError(f"attn_mask must be bool (True keeps a score), float32 or the dtype of query ({query.dtype}) "
                        f"(added to the scores), got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    try:
        ok = 2 <= attn_mask.dim() <= len(score_shape) and torch.broadcast_shapes(attn_mask.shape,
                                                                                 score_shape) == score_shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' shape "
                         f"(..., L, S) = {tuple(score_shape)}")
    unservable = None
    if kind == MASK_ADDITIVE and requires_grad(attn_mask) and torch.is_grad_enabled():
        unservable = "attn_mask requires grad (the fused op treats the mask as a constant)"
    elif kind == MASK_ADDITIVE and fwAD.unpack_dual(attn_mask).tangent is not None:
        unservable = "attn_mask carries a forward-mode tangent (the fused op treats the mask as a constant)"
    return ResolvedMask(attn_mask, kind, is_causal, 0, unservable)
