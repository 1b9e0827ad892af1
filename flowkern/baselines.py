"""What flowkern is measured against: stock PyTorch ways of getting an attention JVP."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def math_sdpa_jvp(q, k, v, q_t, k_t, v_t, *, is_causal=False):
    """`torch.func.jvp` over `F.scaled_dot_product_attention` forced to the math backend, the only stock SDPA
    backend with a forward-mode rule (O(N²) memory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=is_causal,
                                                                              enable_gqa=gqa),
                              (q, k, v), (q_t, k_t, v_t))


def jvp_flash_attention_available() -> bool:
    return importlib.util.find_spec("jvp_flash_attention") is not None


def jvp_flash_attention_jvp(q, k, v, q_t, k_t, v_t, *, is_causal=False):
    """The PyPI package `jvp-flash-attention` under `torch.func.jvp` (where installed)."""
    from jvp_flash_attention.jvp_attention import attention as jfa

    return torch.func.jvp(lambda a, b, c: jfa(a, b, c, causal=is_causal), (q, k, v), (q_t, k_t, v_t))
