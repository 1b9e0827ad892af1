"""Pure-PyTorch references with the public signatures: the ground truth for benchmarks and the CPU fallback.

They run the same autograd.Function as the public ops on the PyTorch backend (`flowkern/attention/reference.py`),
so they differentiate, take forward-mode tangents, and keep O(N·D) memory like the kernels.
"""
from __future__ import annotations

from flowkern._config import use_backend
from flowkern.attention import api as _attention_api


def jvp_attention(*args, **kwargs):
    """`flowkern.jvp_attention` (same arguments) in chunked PyTorch."""
    with use_backend("torch"):
        return _attention_api.jvp_attention(*args, **kwargs)


def attention(*args, **kwargs):
    """`flowkern.attention` (same arguments as `F.scaled_dot_product_attention`) in chunked PyTorch."""
    with use_backend("torch"):
        return _attention_api.attention(*args, **kwargs)


def divergence(fn, x, *args, **kwargs):
    """`flowkern.divergence` on the PyTorch backend (probes from a `torch.Generator`, plain dot-product reduction)."""
    # the module, not the function `flowkern.divergence` that shadows it as a package attribute
    from flowkern.divergence import divergence as _divergence

    with use_backend("torch"):
        return _divergence(fn, x, *args, **kwargs)
