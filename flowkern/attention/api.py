"""Public attention ops: `jvp_attention` (explicit tangents) and `attention` (drop-in, forward-AD aware)."""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from flowkern._autograd import no_tangent_possible
from flowkern._dispatch import select_backend
from flowkern._fused import apply_dual, apply_explicit, primal
from flowkern._nvtx import nvtx_range
from flowkern._validate import check_bool, check_finite_scalar, check_like, check_tensor
from flowkern.attention.op import AttentionOp
from flowkern.attention.spec import MASK_ADDITIVE, MASK_BOOL, MASK_NONE, AttentionSpec

MAX_TRITON_HEAD_DIM = 256


def _spec(q, k, v, attn_mask, causal, scale, op: str) -> AttentionSpec:
    """Validate the primals, mask and options; return the call's spec (backend included)."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_like("k", k, "q", q, shape=False)
    check_like("v", v, "q", q, shape=False)
    batch, q_heads, seq_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape [B, Hkv, Nk, D], got k {tuple(k.shape)} and v {tuple(v.shape)}")
    kb, kv_heads, seq_k, kd = k.shape
    if kb != batch:
        raise ValueError(f"k must have batch size {batch} (that of q), got k of shape {tuple(k.shape)}")
    if kd != head_dim:
        raise ValueError(f"k and v must have head dim {head_dim} (that of q), got k of shape {tuple(k.shape)}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads}) for GQA/MQA; "
                         f"q is {tuple(q.shape)}, k is {tuple(k.shape)}")
    if min(batch, q_heads, seq_q, seq_k, head_dim) < 1:
        raise ValueError(f"q, k, v must have no empty dimension, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    check_bool("causal", causal)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else check_finite_scalar("scale", scale)

    mask_kind = MASK_NONE
    if attn_mask is not None:
        target = (batch, q_heads, seq_q, seq_k)
        check_tensor("attn_mask", attn_mask, dtypes=None)
        if attn_mask.dtype == torch.bool:
            mask_kind = MASK_BOOL
        elif attn_mask.is_floating_point():
            mask_kind = MASK_ADDITIVE
        else:
            raise TypeError(f"attn_mask must be bool (True keeps a score) or floating (added to the scores), "
                            f"got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        try:
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, Nq, Nk] = "
                             f"{list(target)}")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("attn_mask requires grad, but gradients with respect to attn_mask are not supported; "
                             "pass attn_mask.detach()")
        if fwAD.unpack_dual(attn_mask).tangent is not None:
            raise ValueError("attn_mask carries a forward-mode tangent, which flowkern attention does not support; "
                             "pass a mask without one")

    triton_reason = None
    if head_dim > MAX_TRITON_HEAD_DIM:
        triton_reason = f"the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}, got {head_dim}"
    backend = select_backend(op, q.device, q.dtype, triton_reason=triton_reason)
    return AttentionSpec(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, scale, mask_kind, backend)


@torch.compiler.disable
def jvp_attention(q, k, v, q_t, k_t, v_t, *, causal=False, attn_mask=None, scale=None):
    """Softmax attention and its forward-mode tangent, from ONE fused kernel pass.

    With S = c·QKᵀ + mask (c = `scale`, default 1/√D), P = softmax(S) over keys and O = PV:
        out   = O
        out_t = Ȯ = (P ⊙ (Ṡ − μ))V + PV̇,  Ṡ = c·(Q̇Kᵀ + QK̇ᵀ),  μᵢ = Σⱼ PᵢⱼṠᵢⱼ
    computed with an online softmax: neither S nor P is ever stored (memory O(N·D)).

    Args:
        q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hq a multiple of Hkv (GQA/MQA read k/v without copies).
        q_t, k_t, v_t: tangents, each shaped and typed like its primal.
        causal: query i sees keys j ≤ i (top-left aligned, exactly `F.scaled_dot_product_attention(is_causal=True)`,
            also when Nq ≠ Nk).
        attn_mask: bool (True keeps) or additive float, broadcastable to [B, Hq, Nq, Nk]; −inf allowed. A row with
            every key removed gives out = 0 and out_t = 0 (never NaN). Combines with `causal`.
        scale: finite float; default 1/√D.
    Dtypes: float16, bfloat16, float32 (float32 accumulation, outputs in the input dtype) on the Triton backend;
        float64 too on the PyTorch reference.
    Returns:
        (out, out_t), both [B, Hq, Nq, D]. `out` is differentiable w.r.t. q, k, v (flash backward from the saved
        log-sum-exp). `out_t` is stop-gradient: a backward pass that reaches it raises.

    Example:
        >>> out, out_t = flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, causal=True)
    """
    spec = _spec(q, k, v, attn_mask, causal, scale, "flowkern.jvp_attention")
    for name, t, ref_name, ref in (("q_t", q_t, "q", q), ("k_t", k_t, "k", k), ("v_t", v_t, "v", v)):
        check_like(name, t, ref_name, ref)
    for name, x in zip(("q", "k", "v", "q_t", "k_t", "v_t"), (q, k, v, q_t, k_t, v_t)):
        if fwAD.unpack_dual(x).tangent is not None:
            raise NotImplementedError(
                f"flowkern.jvp_attention: {name} carries a forward-mode AD tangent; the tangent of out_t would be a "
                "second-order term, which is not supported. Under torch.func.jvp / forward_ad call "
                "flowkern.attention(q, k, v) instead: it takes its tangents from the dual inputs.")
    return apply_explicit(AttentionOp("flowkern.jvp_attention", spec), (q, k, v, attn_mask), (q_t, k_t, v_t, None))


@torch.compiler.disable
def attention(q, k, v, *, causal=False, attn_mask=None, scale=None):
    """Drop-in for `F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=causal, scale=scale)` that also
    works under `torch.func.jvp`, `torch.autograd.forward_ad` and ordinary backward.

    Under forward-mode AD the tangent comes from the fused kernel in the same pass as the output (the tangents of
    q, k, v are unpacked and passed to it), so a JVP costs one fused pass. Shapes, masks, dtypes and GQA as in
    `jvp_attention`, except that `causal` and `attn_mask` may be combined here (SDPA refuses that).

    `torch.compile`: the op runs eagerly inside compiled code (`torch.compiler.disable`: one graph break per call;
    `fullgraph=True` refuses loudly). Dynamo is known to drop custom forward-AD rules and `torch.library.custom_op`
    has none, so tracing it could only give silently wrong tangents; eagerly, `torch.func.jvp(torch.compile(f))` and
    dual tensors through a compiled `f` get the fused tangent (tested).
    """
    spec = _spec(primal(q), primal(k), primal(v), attn_mask, causal, scale, "flowkern.attention")
    if _stock_sdpa_serves(spec, attn_mask, q.dtype):
        # the PyTorch backend, no tangent possible, nothing SDPA reads differently: its native kernel and backward
        with nvtx_range("flowkern.attention"):
            return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, scale=spec.scale)
    return apply_dual(AttentionOp("flowkern.attention", spec), q, k, v, attn_mask)


def _stock_sdpa_serves(spec: AttentionSpec, attn_mask, dtype: torch.dtype) -> bool:
    """An ordinary forward or grad pass on the PyTorch backend that `F.scaled_dot_product_attention` computes with the
    same meaning: no mask, one key/value head per query head, causal only on square scores (SDPA aligns causal masks
    top-left), float32/float64, and no forward-mode tangent possible (no `forward_ad` level open, no torch.func
    transform active)."""
    return (spec.backend == "torch" and attn_mask is None and spec.q_heads == spec.kv_heads
            and (not spec.causal or spec.seq_q == spec.seq_k) and dtype in (torch.float32, torch.float64)
            and no_tangent_possible())
