"""Pure-PyTorch flow-map jump: the reference backend and the CPU fallback.

Same maths as `flowkern/kernels/flow_map.py`: h = s − t, y = x + h·u, ℓ' = ℓ + h·D, in the accumulation dtype
(`flowkern._precision`), results cast to the output dtype. A multiply then an add (never a fused multiply-add): both
are correctly rounded elementwise, so a row's result does not depend on its position in the batch (the samplers
rely on this for `sample_many` == `sample`, bit for bit).
"""
from __future__ import annotations

from flowkern._precision import accumulation_dtype
from flowkern.flow_map.triton_launch import allocate


def jump_fwd(x, u, t, s, logp, div, *, out=None):
    """(x + (s − t)·u [B, F], ℓ + (s − t)·D [B] or None), written into `out` = (y, logp_out) when given."""
    y, logp_out = allocate(x, logp) if out is None else out
    acc = accumulation_dtype(x.dtype)
    h = s.to(acc) - t.to(acc)  # [B]
    y.copy_(x.to(acc) + h[:, None] * u.to(acc))
    if logp is not None:
        lacc = accumulation_dtype(logp.dtype)
        logp_out.copy_(logp.to(lacc) + h.to(lacc) * div.to(lacc))
    return y, logp_out
