"""Host launcher of the CUDA flow-map jump (`csrc/flow_map_jump.cu`, op `torch.ops.flowkern.flow_map_jump`)."""
from __future__ import annotations

import torch

from flowkern import _cuda_ext
from flowkern.flow_map.triton_launch import allocate


def jump_fwd(x, u, t, s, logp, div, *, out=None):
    """(x + (s − t)·u [B, F], ℓ + (s − t)·D [B] or None); x, u with unit feature stride; written into `out` =
    (y, logp_out) when given."""
    y, logp_out = allocate(x, logp) if out is None else out
    ops = _cuda_ext.load()
    if logp is None:
        dummy = torch.zeros(0, dtype=torch.float32, device=x.device)
        ops.flow_map_jump(x, u, t, s, dummy, dummy, y, dummy, False)
    else:
        ops.flow_map_jump(x, u, t, s, logp, div, y, logp_out, True)
    return y, logp_out
