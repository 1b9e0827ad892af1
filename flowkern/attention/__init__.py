"""Fused attention with forward-mode tangents: `attention` (SDPA's drop-in), `jvp_attention` (explicit tangents)
and `patch_sdpa` (routes `F.scaled_dot_product_attention` to `attention`)."""
from flowkern.attention.api import attention, jvp_attention
from flowkern.attention.patch import SDPA_PATCH, patch_sdpa

__all__ = ["SDPA_PATCH", "attention", "jvp_attention", "patch_sdpa"]
