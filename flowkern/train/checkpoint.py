"""Checkpoint files: one `torch.save` dict of plain values, written atomically (temp file + rename).

Format 2 (docs/training.md). The engine (`Trainer.state_dict`) writes: format, method (its registry name),
method_kwargs (the method's keyword arguments, enough to rebuild it), method_state (state_dict of the Method:
model, teacher, target copies, auxiliary networks), ema, optimizers and schedulers ({"model": ..., <auxiliary
name>: ...}), step, skipped, losses, rng (one dict per rank), config (`TrainConfig` as a dict). `flowkern train`
adds arch and teacher_arch (the networks' constructor arguments), data (the dataset's name) and run (the
resolved train-level settings)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = 2
ENGINE_KEYS = ("method", "method_kwargs", "method_state", "ema", "optimizers", "schedulers", "step", "skipped",
               "rng", "config")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another format, or from another method."""


def save(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def require(state: dict, keys, where: str = "checkpoint") -> dict:
    """`state` itself; CheckpointError naming the keys it lacks."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(map(repr, missing))} (written by another program or an "
                              f"older flowkern?)")
    return state


def load(path, *, method: str | None = None, keys=ENGINE_KEYS) -> dict:
    """Read a checkpoint; CheckpointError if it is missing, not a flowkern training checkpoint of format 2, lacks
    one of `keys`, or (when `method` is given) was written by another method."""
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as err:
        raise CheckpointError(f"{where} could not be read: {err}") from err
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{str(path)!r} is not a flowkern training checkpoint (it has no 'format' key)")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{where} has format {state['format']!r}; this flowkern reads format {FORMAT} "
                              f"(retrain it with this version)")
    if method is not None and state.get("method") != method:
        raise CheckpointError(f"{where} was written by method {state.get('method')!r}, not {method!r}")
    return require(state, keys, where)
