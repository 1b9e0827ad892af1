"""Fused attention with forward-mode tangents: `jvp_attention` and the drop-in `attention`."""
from flowkern.attention.api import attention, jvp_attention

__all__ = ["attention", "jvp_attention"]
