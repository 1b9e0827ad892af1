"""Host launcher of the CUDA flow-map jump (`csrc/flow_map_jump.cu`, op `torch.ops.flowkern.flow_map_jump`)."""
from __future__ import annotations

import torch

from flowkern import _cuda_ext


def jump_fwd(x, u, t, s, logp, div, y, logp_out):
    """Write x + (s − t)·u to y ([B, F], unit feature stride) and, with logp, ℓ + (s − t)·D to logp_out ([B])."""
    ops = _cuda_ext.load()
    has_logp = logp is not None
    if not has_logp:
        dummy = torch.zeros(0, dtype=torch.float32, device=x.device)
        logp = div = logp_out = dummy
    ops.flow_map_jump(x, u, t, s, logp, div, y, logp_out, has_logp)
