"""The one exponential-moving-average update, shared by the training engine's EMA copies and the methods' EMA targets.

θ̄ ← d·θ̄ + (1 − d)·θ, as one fused `torch._foreach_lerp_` over every parameter (no per-parameter Python loop); on
FSDP-sharded parameters over this rank's shards.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(averages: list[torch.Tensor], values: list[torch.Tensor], decay: float) -> None:
    """In place: averages[i] ← decay·averages[i] + (1 − decay)·values[i] (values cast to each average's dtype)."""
    if not averages:
        return
    values = [v.detach() if v.dtype == a.dtype else v.detach().to(a.dtype) for a, v in zip(averages, values)]
    torch._foreach_lerp_([_shard(a) for a in averages], [_shard(v) for v in values], 1.0 - decay)


def _shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP: an average and its parameter are sharded alike), a tensor as it is."""
    return x.to_local() if hasattr(x, "to_local") else x


@torch.no_grad()
def ema_update_module_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """θ⁻ ← decay·θ⁻ + (1 − decay)·θ for the parameters of `target` (an EMA copy of `source`); buffers are copied."""
    ema_update_(list(target.parameters()), list(source.parameters()), decay)
    for b_t, b_s in zip(target.buffers(), source.buffers()):
        b_t.copy_(b_s)
