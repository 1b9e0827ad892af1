"""One rank's training batches (`Batches`): the data rows and, for a method that pairs its noise with them, the
paired noise, drawn one step ahead by a worker thread.

Data: a step draws one global batch of world·batch rows, data(n, generator), with the data generator (the same
stream on every rank) and keeps this rank's slice. Noise: a method with a `NoisePairing` (`Method.noise_pairing`)
gets ε drawn from this rank's noise generator and paired with its slice by minibatch optimal transport, whose
assignment is solved on the host (`flowkern.methods.coupling`).

Ahead: with a pairing, the batch of step i + 1 is drawn and paired by the worker while step i runs (the solver
releases the GIL), so the step never waits for the assignment. Only the two generators held here draw, never the
global RNGs the step draws from, so the worker changes no number of a run: with and without it a run is the same
bit for bit. `state_dict` gives the generators' state from before the batch in flight: a checkpoint resumes by
drawing that batch again.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from flowkern._validate import check_int
from flowkern.methods.coupling import NoisePairing

NOISE_SEED_OFFSET = 0x5EED   # the noise generator of rank r starts at seed + 1000·r + this


def noise_seed(seed: int, rank: int) -> int:
    return seed + 1000 * rank + NOISE_SEED_OFFSET


def _start_worker(threads: int, cuda_index: int | None) -> None:
    """The worker thread takes the caller's intra-op thread count (a new thread starts with the default) and, on
    CUDA, the rank's device, so that page-locking does not open a context on device 0."""
    torch.set_num_threads(threads)
    if cuda_index is not None:
        torch.cuda.set_device(cuda_index)


class Batches:
    """(x0, noise) per step for one rank: `next()`; noise is None without a pairing.

    Args:
        data: ``data(n, generator) -> [n, ...]`` float tensor on the CPU, deterministic for a generator state.
        batch: rows per rank; rank, world: this process and their number.
        device: where `next()` puts the tensors (page-locked on the host first for a CUDA device).
        seed: the run's seed (the data generator's; the noise generator's is `noise_seed(seed, rank)`).
        pairing: the method's `NoisePairing`, or None.
        ahead: draw the next batch in a worker thread (default: when there is a pairing to solve).
    """

    def __init__(self, data: Callable, batch: int, *, rank: int, world: int, device: torch.device, seed: int,
                 pairing: NoisePairing | None = None, ahead: bool | None = None):
        if not callable(data):
            raise TypeError(f"data must be callable data(n, generator), got {type(data).__name__}")
        check_int("batch", batch, minimum=1)
        check_int("world", world, minimum=1)
        check_int("rank", rank, minimum=0)
        if rank >= world:
            raise ValueError(f"rank must be < world ({world}), got {rank}")
        if pairing is not None and not isinstance(pairing, NoisePairing):
            raise TypeError(f"pairing must be a flowkern.methods.coupling.NoisePairing or None, "
                            f"got {type(pairing).__name__}")
        self.data, self.batch, self.rank, self.world, self.device = data, batch, rank, world, torch.device(device)
        self.pairing = pairing
        self.data_generator = torch.Generator().manual_seed(seed)
        self.noise_generator = torch.Generator().manual_seed(noise_seed(seed, rank))
        self.ahead = pairing is not None if ahead is None else bool(ahead)
        cuda_index = None
        if self.ahead and self.device.type == "cuda":   # "cuda" without an index: the caller's current device
            cuda_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flowkern-batches", initializer=_start_worker,
                                        initargs=(torch.get_num_threads(), cuda_index)) if self.ahead else None
        self._next: tuple[Future, dict] | None = None   # the batch in flight and the states it was drawn from

    def _draw(self) -> tuple[Tensor, Tensor | None]:
        b = self.batch
        x0 = self.data(b * self.world, self.data_generator)[self.rank * b:(self.rank + 1) * b]
        noise = None if self.pairing is None else self.pairing.draw(x0, self.noise_generator)
        if self.device.type == "cuda" and x0.device.type == "cpu":   # page-locked: the copy does not hold the host
            x0, noise = x0.pin_memory(), None if noise is None else noise.pin_memory()
        return x0, noise

    def _states(self) -> dict:
        return {"data": self.data_generator.get_state(), "noise": self.noise_generator.get_state()}

    def next(self) -> tuple[Tensor, Tensor | None]:
        """This step's (x0, noise) on the device; with `ahead`, the next step's starts drawing before it returns."""
        if self._next is None:
            x0, noise = self._draw()
        else:
            future, _ = self._next
            self._next = None
            x0, noise = future.result()
        if self._pool is not None:
            states = self._states()
            self._next = (self._pool.submit(self._draw), states)
        to_device = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        return to_device(x0), to_device(noise)

    def state_dict(self) -> dict:
        """{"data": ..., "noise": ...}: the generators' states that the next `next()` draws from."""
        return dict(self._next[1]) if self._next is not None else self._states()

    def load_state_dict(self, state: dict, *, reseed: int) -> None:
        """Continue from `state` (`state_dict`'s; the batch in flight is dropped). A state without "noise" (a
        checkpoint from before the noise generator, or from another world size) starts the noise generator
        afresh at noise_seed(reseed, rank)."""
        self._drop()
        self.data_generator.set_state(state["data"])
        if "noise" in state:
            self.noise_generator.set_state(state["noise"])
        else:
            self.noise_generator.manual_seed(noise_seed(reseed, self.rank))

    def _drop(self) -> None:
        if self._next is not None:
            future, _ = self._next
            self._next = None
            future.exception()   # wait; a failed draw ahead of a step that never runs is nobody's error
