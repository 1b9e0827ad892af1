"""What one attention call is, once its inputs are validated: the static parts every backend needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@dataclass(frozen=True)
class AttentionSpec:
    """One call on canonical inputs q [B, Hq, Nq, E], k [B, Hkv, Nk, E], v [B, Hkv, Nk, Ev].

    `is_causal` removes keys j > i + `causal_offset` from query row i: offset 0 is SDPA's top-left `is_causal`,
    Nk − Nq the bottom-right alignment of `causal_lower_right`."""
    batch: int
    q_heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    is_causal: bool
    causal_offset: int
    scale: float
    mask_kind: int
    backend: str

    @property
    def kv_group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def padded_head_dim(self) -> int:
        """The one head dim of a kernel that takes a single one for q, k and v."""
        return max(self.head_dim, self.head_dim_v)


def expand_mask(attn_mask: torch.Tensor | None, spec: AttentionSpec) -> torch.Tensor | None:
    """The mask as a [B, Hq, Nq, Nk] view (stride 0 on broadcast dims; no copy)."""
    if attn_mask is None:
        return None
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask.expand(spec.batch, spec.q_heads, spec.seq_q, spec.seq_k)
