"""Sinusoidal embedding of a time pair (t, s) or (t, t − s), always in float32, with its tangent in one pass."""
from __future__ import annotations

import torch

from flowkern._dispatch import select_backend
from flowkern._precision import accumulation_dtype
from flowkern._validate import check_finite_scalar, check_int, check_like, check_tensor
from flowkern._fused import apply_dual, apply_explicit, primal
from flowkern.ops.time_embedding.op import TimeEmbeddingOp


def _compute_dtype(t: torch.Tensor, s: torch.Tensor) -> torch.dtype:
    """float32, or float64 when a time is float64 (the PyTorch backend only)."""
    return accumulation_dtype(torch.promote_types(t.dtype, s.dtype))


def _op(name, t, s, dim, mode, max_period, time_scale) -> TimeEmbeddingOp:
    check_tensor("t", t, ndim=1)
    check_tensor("s", s, ndim=1)
    if s.shape != t.shape:
        raise ValueError(f"s must have the shape of t, {tuple(t.shape)}, got {tuple(s.shape)}")
    if s.device != t.device:
        raise ValueError(f"s is on {s.device} but t is on {t.device}; they must be on one device")
    if t.shape[0] == 0:
        raise ValueError("t must hold at least one time, got an empty tensor")
    dim = check_int("dim", dim, minimum=2)
    if dim % 2:
        raise ValueError(f"dim must be even (cos and sin halves), got {dim}")
    if mode not in ("ts", "t_delta"):
        raise ValueError(f"mode must be 'ts' (embed t and s) or 't_delta' (embed t and t − s), got {mode!r}")
    max_period = check_finite_scalar("max_period", max_period, positive=True)
    time_scale = check_finite_scalar("time_scale", time_scale)
    backend = select_backend(name, t.device, _compute_dtype(t, s))
    return TimeEmbeddingOp(name, backend, dim, mode == "t_delta", max_period, time_scale)


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


def time_embedding(t, s, dim, *, mode="ts", max_period=10000.0, time_scale=1.0):
    """Sinusoidal embedding of two times, computed in float32 whatever the inputs' dtype or autocast.

    With τ₀ = t and τ₁ = s (mode='ts') or τ₁ = t − s (mode='t_delta'), half = dim/2 and
    f_k = time_scale·max_period^(−k/half):
        E = [cos(f·τ₀), sin(f·τ₀), cos(f·τ₁), sin(f·τ₁)]                  [B, 2·dim], float32
        Ė = [−f·sin(f·τ₀)·τ̇₀, f·cos(f·τ₀)·τ̇₀, −f·sin(f·τ₁)·τ̇₁, f·cos(f·τ₁)·τ̇₁]
    t, s: [B] floating (cast to float32; float64 stays float64, on the PyTorch backend). dim: even, ≥ 2.
    Differentiable w.r.t. t and s (gradients come back in their dtypes); under forward AD the tangent comes from
    the same kernel pass. DiT-style: time_scale=1000 for t ∈ [0, 1].

    Example:
        >>> emb = flowkern.ops.time_embedding(t, s, 256, time_scale=1000.0)   # [B, 512] float32
    """
    op = _op("flowkern.ops.time_embedding", primal(t), primal(s), dim, mode, max_period, time_scale)
    dtype = _compute_dtype(t, s)
    return apply_dual(op, t.to(dtype), s.to(dtype))


def time_embedding_jvp(t, s, dim, t_t, s_t=None, *, mode="ts", max_period=10000.0, time_scale=1.0):
    """(E, Ė) of `time_embedding` from one pass; s_t defaults to zero. Ė is differentiable (reverse over forward)."""
    op = _op("flowkern.ops.time_embedding_jvp", t, s, dim, mode, max_period, time_scale)
    check_like("t_t", t_t, "t", t)
    if s_t is not None:
        check_like("s_t", s_t, "s", s)
    dtype = _compute_dtype(t, s)
    return apply_explicit(op, (t.to(dtype), s.to(dtype)), (_cast(t_t, dtype), _cast(s_t, dtype)))
