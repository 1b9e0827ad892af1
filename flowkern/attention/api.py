"""Public attention ops: `attention` (SDPA's drop-in, forward-AD aware) and `jvp_attention` (explicit tangents)."""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.autograd.forward_ad as fwAD

from flowkern._autograd import no_tangent_possible
from flowkern._dispatch import select_backend
from flowkern._fused import apply_dual, apply_explicit, primal
from flowkern._nvtx import nvtx_range
from flowkern._validate import check_bool, check_like, check_tensor
from flowkern.attention.masks import ResolvedMask, resolve_mask
from flowkern.attention.op import AttentionOp
from flowkern.attention.shapes import CanonicalShapes, canonical_shapes
from flowkern.attention.spec import AttentionSpec

MAX_TRITON_HEAD_DIM = 256
# The function `torch.nn.functional.scaled_dot_product_attention` as PyTorch defines it, kept before any patching
# (`flowkern.patch_sdpa`): every hand-off to SDPA calls this one.
STOCK_SDPA = torch._C._nn.scaled_dot_product_attention
_warned_fallback: set = set()


class Unservable(Exception):
    """A call SDPA accepts that the fused op cannot serve; the message says why."""


def _check_scale(scale, head_dim: int) -> float:
    """SDPA's `scale`: None (1/√E), a real number or a 0-d tensor. A non-finite one is served by SDPA."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else math.inf
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise TypeError(f"scale must be a float or a 0-d tensor, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float (or None), got {type(scale).__name__}")
    return float(scale)


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {dropout_p}")
    return float(dropout_p)


def _autocast(query, key, value, attn_mask):
    """Under `torch.autocast` SDPA runs in the autocast dtype: cast the floating inputs (float64 excepted) as it does."""
    device = query.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return query, key, value, attn_mask
    dtype = torch.get_autocast_dtype(device)

    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype not in (dtype, torch.float64):
            return x.to(dtype)
        return x

    return cast(query), cast(key), cast(value), cast(attn_mask)


def _check_qkv(query, key, value):
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, x)
    check_like("key", key, "query", query, shape=False)
    check_like("value", value, "query", query, shape=False)


def _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, op: str):
    """Validate a call (SDPA's rules; errors name the argument). Returns (shapes, resolved mask, scale, backend)
    or raises `Unservable` for a call SDPA accepts that the fused op cannot take."""
    _check_qkv(query, key, value)
    check_bool("is_causal", is_causal)
    check_bool("enable_gqa", enable_gqa)
    dropout_p = _check_dropout(dropout_p)
    shapes = canonical_shapes(query, key, value, enable_gqa)
    resolved = resolve_mask(attn_mask, is_causal, query, shapes.score_shape)
    scale = _check_scale(scale, shapes.head_dim)
    if dropout_p > 0.0:
        raise NotImplementedError(
            f"{op}: dropout_p > 0 is not supported (the fused kernels have no dropout inside attention); pass "
            "dropout_p=0.0, or under flowkern.patch_sdpa() such calls are handed to "
            "torch.nn.functional.scaled_dot_product_attention")
    if shapes.empty:
        raise Unservable(f"an empty dimension (query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)})")
    if not math.isfinite(scale):
        raise Unservable(f"a non-finite scale ({scale})")
    if resolved.unservable:
        raise Unservable(resolved.unservable)
    width = max(shapes.head_dim, shapes.head_dim_v)
    triton_reason = None
    if width > MAX_TRITON_HEAD_DIM:
        triton_reason = f"the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}, got {width}"
    backend = select_backend(op, query.device, query.dtype, triton_reason=triton_reason)
    return shapes, resolved, scale, backend


def _spec(shapes: CanonicalShapes, resolved: ResolvedMask, scale: float, backend: str) -> AttentionSpec:
    return AttentionSpec(shapes.batch, shapes.q_heads, shapes.kv_heads, shapes.seq_q, shapes.seq_k,
                         shapes.head_dim, shapes.head_dim_v, resolved.is_causal, resolved.causal_offset, scale,
                         resolved.kind, backend)


def stock_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """PyTorch's own SDPA (the math backend where a forward-mode tangent is possible: the only one with a rule).
    A `CausalBias` is materialised first: while SDPA is patched its own dispatch would not recognise the call."""
    from torch.nn.attention.bias import CausalBias

    if isinstance(attn_mask, CausalBias):
        attn_mask = attn_mask._materialize(query.device)
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if enable_gqa:
        kwargs["enable_gqa"] = True
    if no_tangent_possible():
        return STOCK_SDPA(query, key, value, **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return STOCK_SDPA(query, key, value, **kwargs)


def warn_fallback(op: str, reason: str) -> None:
    """One warning per (op, reason) and process: the call is served by PyTorch's SDPA instead."""
    if (op, reason) not in _warned_fallback:
        _warned_fallback.add((op, reason))
        warnings.warn(f"{op}: {reason}; calling torch.nn.functional.scaled_dot_product_attention instead",
                      stacklevel=3)


@torch.compiler.disable
def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`, same signature and semantics, that also works
    under `torch.func.jvp`, `torch.autograd.forward_ad` and ordinary backward with the fused kernel.

    With S = c·QKᵀ + M (c = `scale`, default 1/√E; M the mask), P = softmax(S) over keys and O = PV. Under forward
    AD the tangent Ȯ = (P ⊙ (Ṡ − μ))V + PV̇ (Ṡ = c·(Q̇Kᵀ + QK̇ᵀ), μᵢ = Σⱼ PᵢⱼṠᵢⱼ) comes from the same fused kernel pass
    as O: the tangents of query, key, value are unpacked and passed to it, so a JVP costs one pass.

    Args:
        query: (..., L, E); key: (..., S, E); value: (..., S, Ev). The leading dims broadcast together.
        attn_mask: None, a bool mask (True keeps a score), an additive float mask (float32 or query's dtype, −inf
            allowed), broadcastable to (..., L, S), or a `torch.nn.attention.bias.CausalBias`
            (`causal_upper_left` / `causal_lower_right`). May be combined with `is_causal`.
        dropout_p: must be 0.0 (dropout inside attention raises NotImplementedError).
        is_causal: query i sees keys j ≤ i (top-left aligned, as SDPA, also when L ≠ S).
        scale: a float or 0-d tensor; default 1/√E.
        enable_gqa: dim −3 is the head dim and key/value may have fewer heads than query (a divisor of them).
    Dtypes: float16, bfloat16, float32 (float32 accumulation) on the Triton backend, float64 too on the PyTorch
        reference; under `torch.autocast` the inputs are cast to the autocast dtype first, as SDPA does.
    Returns:
        (..., L, Ev). A query row whose every key is removed gives 0 (SDPA's math backend does the same).

    Calls SDPA accepts that the fused op cannot take (an empty dim, a non-finite scale, a mask that requires grad or
    carries a tangent) are handed to SDPA itself with a one-time warning saying why.

    `torch.compile`: the op runs eagerly inside compiled code (`torch.compiler.disable`: one graph break per call;
    `fullgraph=True` refuses loudly). Dynamo is known to drop custom forward-AD rules, so tracing it could only give
    silently wrong tangents.

    Example:
        >>> out = flowkern.attention(q, k, v, is_causal=True)
        >>> out, out_t = torch.func.jvp(lambda q: flowkern.attention(q, k, v), (q,), (q_t,))
    """
    try:
        return serve(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, op="flowkern.attention")
    except Unservable as why:
        warn_fallback("flowkern.attention", str(why))
        with nvtx_range("flowkern.attention"):
            return stock_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@torch.compiler.disable
def serve(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *, op: str):
    """`attention` on the fused op, or `Unservable` (nothing computed) for a call only SDPA can serve."""
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    shapes, resolved, c, backend = _prepare(primal(query), primal(key), primal(value), attn_mask, dropout_p,
                                            is_causal, scale, enable_gqa, op)
    spec = _spec(shapes, resolved, c, backend)
    q, k, v = shapes.query_view(query), shapes.key_value_view(key), shapes.key_value_view(value)
    mask = shapes.mask_view(resolved.mask)
    if _stock_sdpa_serves(spec, mask, q.dtype):
        # the PyTorch backend, no tangent possible, nothing SDPA reads differently: its native kernel and backward
        with nvtx_range(op):
            return shapes.output(STOCK_SDPA(q, k, v, is_causal=spec.is_causal, scale=spec.scale))
    return shapes.output(apply_dual(AttentionOp(op, spec), q, k, v, mask))


@torch.compiler.disable
def jvp_attention(query, key, value, query_t, key_t, value_t, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                  scale=None, enable_gqa=False):
    """Softmax attention and its forward-mode tangent, from ONE fused kernel pass: (out, out_t).

    Same inputs and semantics as `flowkern.attention` (SDPA's), plus the tangents `query_t`, `key_t`, `value_t`, each
    shaped and typed like its primal:
        out   = O
        out_t = Ȯ = (P ⊙ (Ṡ − μ))V + PV̇,  Ṡ = c·(Q̇Kᵀ + QK̇ᵀ),  μᵢ = Σⱼ PᵢⱼṠᵢⱼ
    computed with an online softmax: neither S nor P is ever stored (memory O(N·D)).

    Returns:
        (out, out_t), both (..., L, Ev). `out` is differentiable w.r.t. query, key, value (flash backward from the
        saved row statistics). `out_t` is stop-gradient: a backward pass that reaches it raises.
    Raises where `attention` would hand the call to SDPA (an explicit tangent has no SDPA equivalent).

    Example:
        >>> out, out_t = flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, is_causal=True)
    """
    op = "flowkern.jvp_attention"
    _check_qkv(query, key, value)
    for name, t, ref_name, ref in (("query_t", query_t, "query", query), ("key_t", key_t, "key", key),
                                   ("value_t", value_t, "value", value)):
        check_like(name, t, ref_name, ref)
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    query_t, key_t, value_t = (t.to(x.dtype) for t, x in ((query_t, query), (key_t, key), (value_t, value)))
    try:
        shapes, resolved, c, backend = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                enable_gqa, op)
    except Unservable as why:
        raise ValueError(f"{op}: the fused op cannot serve {why}") from None
    for name, x in zip(("query", "key", "value", "query_t", "key_t", "value_t"),
                       (query, key, value, query_t, key_t, value_t)):
        if fwAD.unpack_dual(x).tangent is not None:
            raise NotImplementedError(
                f"{op}: {name} carries a forward-mode AD tangent; the tangent of out_t would be a second-order term, "
                "which is not supported. Under torch.func.jvp / forward_ad call flowkern.attention(query, key, "
                "value) instead: it takes its tangents from the dual inputs.")
    spec = _spec(shapes, resolved, c, backend)
    views = (shapes.query_view, shapes.key_value_view, shapes.key_value_view) * 2
    args = [view(x) for view, x in zip(views, (query, key, value, query_t, key_t, value_t))]
    out, out_t = apply_explicit(AttentionOp(op, spec), (*args[:3], shapes.mask_view(resolved.mask)),
                                (*args[3:], None))
    return shapes.output(out), shapes.output(out_t)


def _stock_sdpa_serves(spec: AttentionSpec, attn_mask, dtype: torch.dtype) -> bool:
    """An ordinary forward or grad pass on the PyTorch backend that SDPA computes with the same meaning: no mask, one
    key/value head per query head, causal only top-left on square scores, float32/float64, and no forward-mode
    tangent possible (no `forward_ad` level open, no torch.func transform active)."""
    return (spec.backend == "torch" and attn_mask is None and spec.q_heads == spec.kv_heads
            and (not spec.is_causal or (spec.seq_q == spec.seq_k and spec.causal_offset == 0))
            and dtype in (torch.float32, torch.float64) and no_tangent_possible())
