"""Capturing and restoring random-number-generator state, in one place.

* `get_state()` / `set_state(state)`: every RNG a training step touches (torch CPU, every initialised CUDA device,
  numpy, python), for exact resume. Plain tensors and containers only.
* `replay_rng(device)`: run a block, then rewind the torch generators to where it started, so the next pass draws
  the same random numbers (the same dropout masks) as the pass inside the block.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _numpy_state() -> dict:
    """numpy's global MT19937 state as plain values and a tensor (a checkpoint loads it with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))


def get_state() -> dict:
    """Plain tensors, numbers, strings and containers only."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def replay_rng(device: torch.device):
    """Run a block, then restore the torch RNG state it started from (CPU always, plus `device`'s CUDA generator)."""
    devices = [device] if device.type == "cuda" else []
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        for d, state in zip(devices, cuda_states):
            torch.cuda.set_rng_state(state, d)
