"""Checkpoint files: one `torch.save` dict of plain values, written atomically, checksummed, read without code.

Format 2 (docs/training.md). The engine (`Trainer.state_dict`) writes: format, method (its registry name),
method_kwargs (the method's keyword arguments, enough to rebuild it), method_state (state_dict of the Method:
model, teacher, target copies, auxiliary networks), ema, optimizers and schedulers ({"model": ..., <auxiliary
name>: ...}), step, skipped, losses, rng (one dict per rank), config (`TrainConfig` as a dict). `flowkern train`
adds arch and teacher_arch (the networks' constructor arguments), data (the dataset's name) and run (the
resolved train-level settings).

`save` adds ``checksum``: the SHA-256 of the payload (`payload_digest`: every key, the structure, each tensor's
dtype, shape and bytes, every number and string, in order). `load` reads with ``weights_only=True`` (plain
tensors, numbers, strings and containers only: a pickled object is refused before it runs), recomputes the
digest and refuses a file whose bytes changed, and refuses non-finite weights."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch

from flowkern.train.atomic import WriteError, write_atomically

FORMAT = 2
ENGINE_KEYS = ("method", "method_kwargs", "method_state", "ema", "optimizers", "schedulers", "step", "skipped",
               "rng", "config")
WEIGHT_KEYS = ("method_state", "ema", "teacher_weights")   # every floating tensor under these must be finite


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupted, of another format, or from another method."""


class CheckpointWriteError(WriteError):
    """A checkpoint that could not be written (e.g. a full disk); the last good checkpoint is kept."""


def _feed(h, obj) -> None:
    """Hash `obj` with its structure: a type tag, then the content (tensors: dtype, shape, raw bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + struct.pack(f"<{t.dim() + 1}q", t.dim(), *t.shape))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (bool, int, float, str, bytes, type(None))):
        h.update(b"S" + type(obj).__name__.encode() + b":" + repr(obj).encode() + b";")
    else:
        h.update(b"O" + type(obj).__name__.encode() + b":" + repr(obj).encode() + b";")


def payload_digest(payload: dict) -> str:
    """SHA-256 (hex) of everything in `payload` except its ``checksum`` key."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "checksum"})
    return h.hexdigest()


def save(path, payload: dict) -> Path:
    """Write `payload` (plus format and checksum) to `path` atomically; CheckpointWriteError naming the file and
    the reason when it cannot (the temporary file is removed, an existing checkpoint at `path` is kept)."""
    state = {"format": FORMAT, **{k: v for k, v in payload.items() if k not in ("format", "checksum")}}
    state["checksum"] = payload_digest(state)
    try:
        return write_atomically(path, lambda f: _write(state, f), what="checkpoint")
    except WriteError as err:
        raise CheckpointWriteError(str(err)) from err.__cause__


def _write(state: dict, file) -> None:
    torch.save(state, file)


def require(state: dict, keys, where: str = "checkpoint") -> dict:
    """`state` itself; CheckpointError naming the keys it lacks."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(map(repr, missing))} (written by another program or an "
                              f"older flowkern?)")
    return state


def _non_finite(obj, prefix: str):
    """The first key path under `obj` holding a floating tensor with a NaN or Inf, else None."""
    if isinstance(obj, torch.Tensor):
        return prefix if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if found is not None:
            return found
    return None


def check_finite(state: dict, where: str = "checkpoint") -> dict:
    """`state` itself; CheckpointError naming the first weight (under `WEIGHT_KEYS`) that is NaN or infinite."""
    for key in WEIGHT_KEYS:
        bad = _non_finite(state.get(key, {}), key)
        if bad is not None:
            raise CheckpointError(f"{where} holds non-finite weights ({bad} has NaN or Inf values): the run it "
                                  f"comes from diverged; use an earlier checkpoint or retrain with a lower --lr")
    return state


def load(path, *, method: str | None = None, keys=ENGINE_KEYS) -> dict:
    """Read a checkpoint; CheckpointError if it is missing, not a flowkern training checkpoint of format 2, carries
    anything but plain data, fails its checksum, holds non-finite weights, lacks one of `keys`, or (when `method` is
    given) was written by another method."""
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if path.is_dir():
        raise CheckpointError(f"{where} is a directory, not a checkpoint file (the run's file is "
                              f"{str(path / 'checkpoint.pt')!r})")
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{where} could not be read (not a flowkern checkpoint, or a damaged one): "
                              f"{first}") from err
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{str(path)!r} is not a flowkern training checkpoint (it has no 'format' key)")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{where} has format {state['format']!r}; this flowkern reads format {FORMAT} "
                              f"(retrain it with this version)")
    if "checksum" not in state:
        raise CheckpointError(f"{where} has no checksum (written by an older flowkern or by hand); retrain it")
    if payload_digest(state) != state["checksum"]:
        raise CheckpointError(f"{where} is corrupted: its content does not match its checksum (a damaged copy or "
                              f"an edited file); use another copy or an earlier checkpoint")
    if method is not None and state.get("method") != method:
        raise CheckpointError(f"{where} was written by method {state.get('method')!r}, not {method!r}")
    require(state, keys, where)
    return check_finite(state, where)
