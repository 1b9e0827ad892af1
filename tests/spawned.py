"""Multi-process tests (gloo on CPU): `spawn_ranks` runs fn(rank, world, port, *args) in `world` spawned processes.

* The port is a free one, probed and retried (another process can take it between the probe and the bind).
* The ranks are killed and the test fails after `deadline_s`: a hung collective must not hang the suite. Shortly
  before that each still-running worker prints every thread's Python stack, so the log shows where it hung.
* Each worker prints every thread's Python stack if it dies of a signal (`faulthandler`).
* A worker that has saved its results ends with `leave()`: a barrier, then `os._exit(0)`, with its DDP/FSDP
  model and process group still alive. Tearing them down is where torch's gloo backend can fail under load: the
  ProcessGroupGloo destructor joins its worker threads while holding the GIL, and a worker thread still
  destroying a finished AsyncWork (whose captured thread-local state holds a Python object) waits for the GIL:
  a deadlock (seen: main thread in ~ProcessGroupGloo → std::thread::join, pt_gloo_runloop in ~AsyncWork →
  gil_scoped_acquire); at interpreter exit the same race aborts the process ("terminate called without an
  active exception", SIGABRT). That teardown is torch's, not anything a test here checks. A worker that
  returns without `leave()` exits the same way after `fn`; one that raises still fails the test with its
  traceback, as under plain `mp.spawn`.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leave() -> None:
    """End a worker whose results are saved: meet every rank at a barrier (no rank leaves while another still
    talks to it), then exit at once, tearing nothing down (module docstring). After a process group is destroyed
    (the CLI destroys its own) it just exits."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_then_leave(rank: int, fn, world: int, port: int, args: tuple, dump_after_s: float) -> None:
    faulthandler.enable(all_threads=True)
    faulthandler.dump_traceback_later(dump_after_s, exit=False)
    fn(rank, world, port, *args)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world: int, *args, deadline_s: float = 600.0) -> None:
    """fn(rank, world, port, *args) on ranks 0..world-1 (fn: a module-level function, picklable)."""
    for attempt in range(3):
        try:
            ctx = mp.spawn(_run_then_leave, args=(fn, world, free_port(), args, 0.9 * deadline_s), nprocs=world,
                           join=False)
            end = time.monotonic() + deadline_s
            while not ctx.join(timeout=5):
                if time.monotonic() > end:
                    for proc in ctx.processes:
                        proc.kill()
                    raise TimeoutError(f"the {world} ranks did not finish within {deadline_s:.0f} s")
            return
        except Exception as exc:
            if "address already in use" not in str(exc).lower() or attempt == 2:
                raise
