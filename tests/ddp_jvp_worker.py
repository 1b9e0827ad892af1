"""One-pass MeanFlow steps (`flowkern.jvp(..., grad=True)`) for tests/test_nn_jvp_one_pass.py: one process, or one
rank of a gloo DDP group. The single forward runs through the DDP wrapper, so the backward all-reduces."""
from __future__ import annotations

import datetime
import os

import torch
from ddp_worker import BATCH, STEPS, flat_params, global_batch, make_model
from spawned import leave

import flowkern


def one_pass_step(model, opt, x, e, t, r):
    """z_t = (1 − t)x + t·e, v = e − x; (u, du/dt) from one forward; loss ‖u − sg(v − (t − r)·du/dt)‖². Returns the
    gradients of the step (flat)."""
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    u, dudt = flowkern.jvp(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), grad=True)
    loss = (u - (v - (t - r)[:, None] * dudt)).square().sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    return grads


def train_one_pass(model, rank: int = 0, world: int = 1):
    """STEPS SGD steps on this rank's share of each global batch: (gradients of the first step, final parameters)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = BATCH // world
    first = None
    for step in range(STEPS):
        grads = one_pass_step(model, opt, *[b[rank * per:(rank + 1) * per] for b in global_batch(step)])
        first = grads if first is None else first
    return first, flat_params(model)


def rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        results = {}
        with flowkern.use_backend("torch"):
            for find_unused in (False, True):  # True routes DDP's outputs through its own autograd Function
                ddp = torch.nn.parallel.DistributedDataParallel(make_model(), find_unused_parameters=find_unused)
                grads, params = train_one_pass(ddp, rank, world)
                results[find_unused] = {"grads": grads, "params": params}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        leave()   # with the DDP wrappers alive (tests/spawned.py)
    finally:
        torch.distributed.destroy_process_group()
