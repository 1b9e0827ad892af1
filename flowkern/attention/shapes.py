"""SDPA's shape rules, and the canonical [B, H, N, D] views the kernels take.

`F.scaled_dot_product_attention` takes query (..., L, E), key (..., S, E), value (..., S, Ev) with any number of
leading dims that broadcast together (as its matmuls do). With `enable_gqa=True` dim −3 is the head dim: the query's
Hq heads must be a multiple of the key's and the value's, and query head h reads key/value head h // (Hq/Hkv); the
dims before it broadcast. `canonical_shapes` checks those rules (naming the argument) and says how to view the
inputs as q [B, Hq, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev]: the views are differentiable torch ops outside the
fused op, so autograd sums the gradient of a broadcast input and forward AD carries tangents through them.
A key/value broadcast over the query heads (size 1 at dim −3, or no such dim) stays one head (Hkv = 1, read by
every query head without a copy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CanonicalShapes:
    batch_shape: tuple  # the broadcast dims flattened into B
    q_heads: int
    kv_heads: int
    kv_repeat: int  # > 1: GQA with different key and value head counts, both repeated to Hq heads
    out_lead: tuple  # the output's leading dims: (..., L, Ev) = (*out_lead, L, Ev)
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def score_shape(self) -> tuple:
        return (*self.out_lead, self.seq_q, self.seq_k)

    @property
    def empty(self) -> bool:
        return 0 in (self.batch, self.q_heads, self.kv_heads, self.seq_q, self.seq_k, self.head_dim,
                     self.head_dim_v)

    def query_view(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(*self.batch_shape, self.q_heads, *x.shape[-2:]).reshape(self.batch, self.q_heads,
                                                                                  *x.shape[-2:])

    def key_value_view(self, x: torch.Tensor) -> torch.Tensor:
        if self.kv_repeat > 1:
            x = x.repeat_interleave(self.q_heads // x.shape[-3], dim=-3)
        return x.expand(*self.batch_shape, self.kv_heads, *x.shape[-2:]).reshape(self.batch, self.kv_heads,
                                                                                   *x.shape[-2:])

    def mask_view(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """A mask broadcastable to the scores as one broadcastable to [B, Hq, L, S] (a view where it can be)."""
        if mask is None or len(self.out_lead) <= 2:
            return mask
        return mask.expand(self.score_shape).reshape(self.batch, self.q_heads, self.seq_q, self.seq_k)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return o.reshape(*self.out_lead, self.seq_q, o.shape[-1])


def _broadcast(what: str, *shapes) -> tuple:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise ValueError(f"the {what} of query, key and value do not broadcast: "
                         f"{', '.join(str(tuple(s)) for s in shapes)}") from None


def _heads(x: torch.Tensor) -> int:
    return x.shape[-3] if x.dim() >= 3 else 1


def canonical_shapes(query, key, value, enable_gqa: bool) -> CanonicalShapes:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., N, E), got shape {tuple(x.shape)}")
    seq_q, head_dim = query.shape[-2:]
    seq_k, head_dim_v = key.shape[-2], value.shape[-1]
    if key.shape[-1] != head_dim:
        raise ValueError(f"key must have the head dim E = {head_dim} of query (..., L, E), got key of shape "
                         f"{tuple(key.shape)}")
    if value.shape[-2] != seq_k:
        raise ValueError(f"value must have the sequence length S = {seq_k} of key (..., S, E), got value of shape "
                         f"{tuple(value.shape)}")
    if enable_gqa:
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() < 3:
                raise ValueError(f"enable_gqa=True: {name} must have a head dim (..., H, N, E), got shape "
                                 f"{tuple(x.shape)}")
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise ValueError(f"enable_gqa=True: the heads of key ({hk}) and value ({hv}) must divide the heads of "
                             f"query ({hq})")
        batch = _broadcast("batch dims (before the head dim)", query.shape[:-3], key.shape[:-3], value.shape[:-3])
        kv_heads, repeat = (hk, 1) if hk == hv else (hq, hq)
        return CanonicalShapes(batch, hq, kv_heads, repeat, (*batch, hq), seq_q, seq_k, head_dim, head_dim_v)
    lead = _broadcast("leading dims", query.shape[:-2], key.shape[:-2], value.shape[:-2])
    batch, q_heads = (lead[:-1], lead[-1]) if lead else ((), 1)
    shared_kv = _heads(key) == 1 and _heads(value) == 1
    return CanonicalShapes(batch, q_heads, 1 if shared_kv else q_heads, 1, lead, seq_q, seq_k, head_dim,
                           head_dim_v)
