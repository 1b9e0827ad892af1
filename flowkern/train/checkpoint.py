"""Checkpoint files: one `torch.save` dict, written atomically (temp file + rename).

Keys: format, method (its registry name), method_state (state_dict of the Method: model, teacher and target
copies), ema, optimizer, scheduler, step, skipped, rng (one dict per rank: torch CPU/CUDA, numpy, python, the data
generator), config (TrainConfig as a dict), extra (the caller's metadata, e.g. how to rebuild the network)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "flowkern.train/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from another method."""


def save(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load(path, *, method: str | None = None) -> dict:
    """Read a checkpoint; CheckpointError if it is missing, not a flowkern training checkpoint, or (when `method`
    is given) was written by another method."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a flowkern training checkpoint")
    if method is not None and state.get("method") != method:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by method {state.get('method')!r}, "
                              f"not {method!r}")
    return state
