"""`flowkern.patch_sdpa()`: route `torch.nn.functional.scaled_dot_product_attention` to `flowkern.attention`.

Models written against SDPA (diffusers, timm, ...) call `F.scaled_dot_product_attention` by attribute at call time;
with the patch installed that name is `patched_sdpa`, so `torch.func.jvp` and forward-AD duals through an
unmodified model get the fused tangent kernel. Calls the fused op cannot serve keep their meaning: they are handed
to PyTorch's own SDPA with a one-time warning saying why (dropout_p > 0 here; an empty dim, a non-finite scale, a
mask that requires grad in `flowkern.attention`). A module that bound the function to its own name before the patch
(`from torch.nn.functional import scaled_dot_product_attention`) keeps calling SDPA.

Every patched call runs in an NVTX range `flowkern.patch_sdpa` (FLOWKERN_NVTX=1) and is counted in `SDPA_PATCH`:
`fused` (served by flowkern's op), `fallback` (handed to SDPA), `reasons` (fallback reason -> count).
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flowkern._nvtx import nvtx_range
from flowkern.attention import api


@dataclass
class SdpaPatchCounts:
    """What the patched SDPA did since the counts were last reset (`reset()`)."""
    fused: int = 0
    fallback: int = 0
    reasons: Counter = field(default_factory=Counter)

    def reset(self) -> None:
        self.fused, self.fallback = 0, 0
        self.reasons.clear()


SDPA_PATCH = SdpaPatchCounts()
_lock = threading.Lock()
_depth = 0  # nested patch_sdpa() blocks and install() calls


@torch.compiler.disable
def patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` while the patch is installed: `flowkern.attention` where it can serve."""
    with nvtx_range("flowkern.patch_sdpa"):
        if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and 0.0 < dropout_p <= 1.0:
            reason = "dropout_p > 0 (no dropout inside the fused kernels)"
            SDPA_PATCH.fallback += 1
            SDPA_PATCH.reasons[reason] += 1
            api.warn_fallback("flowkern.patch_sdpa", reason)
            return api.stock_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        try:
            out = api.serve(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                            op="flowkern.attention")
        except api.Unservable as why:
            SDPA_PATCH.fallback += 1
            SDPA_PATCH.reasons[str(why)] += 1
            api.warn_fallback("flowkern.patch_sdpa", str(why))
            return api.stock_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        SDPA_PATCH.fused += 1
        return out


def install() -> SdpaPatchCounts:
    """Route `F.scaled_dot_product_attention` to flowkern (nests: each install needs its uninstall)."""
    global _depth
    with _lock:
        if _depth == 0:
            F.scaled_dot_product_attention = patched_sdpa
        _depth += 1
    return SDPA_PATCH


def uninstall() -> None:
    """Undo one `install()`; the last one restores PyTorch's function."""
    global _depth
    with _lock:
        if _depth == 0:
            raise RuntimeError("flowkern.patch_sdpa.uninstall(): the SDPA patch is not installed")
        _depth -= 1
        if _depth == 0:
            F.scaled_dot_product_attention = api.STOCK_SDPA


def installed() -> bool:
    return F.scaled_dot_product_attention is patched_sdpa


@contextlib.contextmanager
def patch_sdpa():
    """``with flowkern.patch_sdpa() as counts:`` every SDPA call inside goes to `flowkern.attention` (see the module
    docstring); `counts` is `SDPA_PATCH`. `patch_sdpa.install()` / `patch_sdpa.uninstall()` do the same without a
    block."""
    counts = install()
    try:
        yield counts
    finally:
        uninstall()


patch_sdpa.install = install
patch_sdpa.uninstall = uninstall
patch_sdpa.installed = installed
patch_sdpa.counts = SDPA_PATCH
