"""FSDP2 for the training engine (`flowkern train --fsdp`, `TrainConfig(fsdp=True)`): shard the networks, and move
their state between sharded parameters and full tensors for checkpoints.

`shard(method)` applies `torch.distributed.fsdp.fully_shard` to `method.model` — first to each member of its
`nn.ModuleList`s (a DiT's blocks, an MLP's layers: one all-gather per block, freed after it), then to the root — and
in the same way to each of the method's `model_copies` (an EMA target that follows the model's weights), so the EMA
between the two stays a per-shard update. Teachers and auxiliary networks stay whole on every rank. Every forward
of a sharded network is a collective: the ranks must call the sharded networks equally often, which every flowkern
method does (its batch splits depend on the batch size only).

A checkpoint holds full tensors (`full_state`), so it loads in one process, in `flowkern eval`, and under another
world size; `shard_like` / `load_optimizer_state` shard them again on resume.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def available() -> bool:
    """torch has FSDP2 (`torch.distributed.fsdp.fully_shard`)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def _shard_module(module: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for child in list(module.modules()):
        if isinstance(child, nn.ModuleList):
            for block in child:
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(module)


def shard(method: nn.Module) -> nn.Module:
    """Shard `method.model` and the method's copies of it in place (module docstring); returns a whole, CPU copy of
    the model taken before, the template `eval_copy` fills with full weights."""
    template = copy.deepcopy(method.model).cpu()
    copies = [getattr(method, name) for name in getattr(method, "model_copies", ())]
    for module in (method.model, *(m for m in copies if m is not None)):
        _shard_module(module)
    return template


def reshard(method: nn.Module) -> None:
    """Every sharded network of the method back to its shards: FSDP2 keeps a root gathered after a forward that has
    no backward (a no-grad target pass), and the EMA updates read the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in method.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state(obj):
    """`obj` (a state dict, nested dicts/lists/tuples) with every DTensor gathered to a full tensor. A collective:
    every rank calls it."""
    dtensor = _dtensor_type()
    if isinstance(obj, dtensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    return obj


def shard_like(value, reference):
    """`value` (a full tensor) sharded as `reference` is when that is a DTensor; else `value`."""
    dtensor = _dtensor_type()
    if isinstance(reference, dtensor) and isinstance(value, torch.Tensor) and not isinstance(value, dtensor):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements)
    return value


def sharded_state_dict(module: nn.Module, full: dict) -> dict:
    """A full state dict for `module` with each entry sharded as the module's own."""
    own = module.state_dict()
    return {k: shard_like(v, own.get(k)) for k, v in full.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load an optimiser state dict of full tensors: each per-parameter tensor of a parameter's shape is sharded as
    that parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in full.get("state", {}).items():
        param = params[int(index)]
        state[index] = {k: shard_like(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
                        for k, v in entry.items()}
    optimizer.load_state_dict({**full, "state": state})


def local(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), a tensor as it is: for norms and scalars the engine decides on."""
    return x.full_tensor() if isinstance(x, _dtensor_type()) else x


def eval_copy(template: nn.Module, params: list[torch.Tensor], device: torch.device) -> nn.Module:
    """A frozen eval-mode copy of `template` on `device` carrying `params` (full tensors, in parameter order)."""
    out = copy.deepcopy(template).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        for p, v in zip(out.parameters(), params):
            p.copy_(v)
    return out
