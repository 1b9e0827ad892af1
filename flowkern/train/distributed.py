"""torch.distributed plumbing for `torchrun` launches (env:// init; gloo on CPU, nccl on CUDA).

The process group gets a timeout (`setup(timeout=...)`, `flowkern train --ddp-timeout`, default
`DEFAULT_TIMEOUT_S`): a collective that waits longer fails instead of hanging for gloo's default 30 minutes. Each
rank records in the group's key-value store the last step it reached the gradient all-reduce of
(`Coordinator.heartbeat`), so the failure names the rank that stopped answering. `Coordinator` also makes every rank
act on a request (a signal, a timed checkpoint) at the same step without a collective: the request is posted in the
store for a step no rank has reached yet."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
_PREFIX = "flowkern/"


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT) if WORLD_SIZE > 1 and it is
    not joined yet, with collectives timing out after `timeout` seconds. Returns (rank, world_size, device):
    LOCAL_RANK's GPU when CUDA is available, else CPU."""
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
    elif device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if env_world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (itself when not distributed)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class Coordinator:
    """Requests every rank acts on at the same step count, and heartbeats naming a rank that stopped answering.

    One process: a request is due at the next check. Under DDP the ranks are at most one step apart (each step
    ends in an all-reduce), so a request posted at the poster's count + 2 reaches every rank before its check of
    that count; the first "stop" posted wins, and "save" is posted by rank 0 only."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.store = _store() if is_distributed() else None
        self._local: set[str] = set()
        self._stop_at: int | None = None

    def request(self, kind: str, count: int) -> None:
        """Ask for `kind` ("stop" or "save") to happen at a step count every rank agrees on."""
        if self.store is None:
            self._local.add(kind)
        elif kind == "stop" and self._stop_at is None:
            if self.store.add(_PREFIX + "stop/claims", 1) == 1:
                self.store.set(_PREFIX + "stop", str(count + 2))
            self._stop_at = int(self.store.get(_PREFIX + "stop"))
        elif kind == "save" and self.rank == 0:
            self.store.set(_PREFIX + f"save/{count + 2}", "1")

    def due(self, count: int) -> set[str]:
        """The requests to act on now, at step count `count`."""
        if self.store is None:
            due, self._local = self._local, set()
            return due
        due = set()
        if self._stop_at is None and self.store.check([_PREFIX + "stop"]):
            self._stop_at = int(self.store.get(_PREFIX + "stop"))
        if self._stop_at is not None and count >= self._stop_at:
            due.add("stop")
        if self.store.check([_PREFIX + f"save/{count}"]):
            due.add("save")
        return due

    def heartbeat(self, step: int) -> None:
        """Record that this rank reached the gradient all-reduce of `step`."""
        if self.store is not None:
            self.store.set(_PREFIX + f"heartbeat/{self.rank}", str(step))

    def silent_ranks(self) -> dict[int, int]:
        """{rank: the last step it reached} for the ranks behind the others (empty if none is behind or the store
        cannot be read)."""
        if self.store is None:
            return {}
        try:
            steps = {r: int(self.store.get(_PREFIX + f"heartbeat/{r}")) if
                     self.store.check([_PREFIX + f"heartbeat/{r}"]) else -1 for r in range(self.world)}
        except (RuntimeError, ValueError):
            return {}
        front = max(steps.values())
        return {r: s for r, s in steps.items() if s < front}
