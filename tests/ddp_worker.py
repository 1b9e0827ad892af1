"""MeanFlow-style training steps for tests/test_nn_jvp.py: one process, or one rank of a gloo DDP group.

The documented pattern: flowkern.jvp on the DDP wrapper (it runs the raw module, no grad, no sync), then the grad pass
THROUGH the wrapper (gradients all-reduced), with the RNG restored in between so dropout draws the same masks.
"""
from __future__ import annotations

import datetime
import os

import torch
from spawned import leave

import flowkern
import flowkern.nn

DIM, HIDDEN, STEPS, BATCH = 2, 16, 3, 8  # BATCH: the global batch, split over the ranks


def make_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = flowkern.nn.MLPFlowMap(DIM, HIDDEN, depth=2, time_dim=8, dropout=dropout, time_scale=3.0)
    with torch.no_grad():  # leave the zero init, so every parameter moves from the first step
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def global_batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, DIM, generator=gen)
    e = torch.randn(BATCH, DIM, generator=gen)
    t = torch.rand(BATCH, generator=gen)
    r = t * torch.rand(BATCH, generator=gen)
    return x, e, t, r


def meanflow_step(model, opt, x, e, t, r):
    """One step: z_t = (1 − t)x + t·e, v = e − x; target = v − (t − r)·du/dt (no grad); ‖u − sg(target)‖²."""
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    u_jvp, dudt = flowkern.nn.jvp(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    target = v - (t - r)[:, None] * dudt
    u = model(z, t, r)
    loss = (u - target).square().sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return u_jvp, u.detach()


def train(model, rank: int = 0, world: int = 1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = BATCH // world
    for step in range(STEPS):
        batch = [b[rank * per:(rank + 1) * per] for b in global_batch(step)]
        meanflow_step(model, opt, *batch)
    return model


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        with flowkern.use_backend("torch"):
            ddp = torch.nn.parallel.DistributedDataParallel(make_model())
            train(ddp, rank, world)
            params = flat_params(ddp.module)
            gathered = [torch.empty_like(params) for _ in range(world)]
            torch.distributed.all_gather(gathered, params)
            assert all(torch.equal(g, gathered[0]) for g in gathered), "replicas diverged"

            # dropout: the JVP pass and the DDP grad pass draw the same masks on every rank
            torch.manual_seed(1234 + rank)
            ddp_drop = torch.nn.parallel.DistributedDataParallel(make_model(dropout=0.5))
            batch = [b[:4] for b in global_batch(0)]
            u_jvp, u = meanflow_step(ddp_drop, torch.optim.SGD(ddp_drop.parameters(), lr=0.1), *batch)
            same_masks = torch.allclose(u_jvp, u, atol=1e-5)
            x, _, t, r = batch
            with torch.no_grad():  # without the restored RNG state, two passes draw different masks
                differs_otherwise = not torch.allclose(ddp_drop(x, t, r), ddp_drop(x, t, r), atol=1e-3)
        torch.save({"params": params, "same_masks": same_masks, "differs_otherwise": differs_otherwise},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        leave()   # with the DDP wrappers alive (tests/spawned.py)
    finally:
        torch.distributed.destroy_process_group()
