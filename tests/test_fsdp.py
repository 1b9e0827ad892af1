"""FSDP2 (`torch.distributed.fsdp.fully_shard`, each block and the root) on CPU with gloo, 2 processes: MeanFlow-style
steps through the sharded model give, after 3 steps, the parameters of one process training on the whole batch —
in the two-pass form of tests/ddp_worker.py (flowkern.jvp, then the grad pass), the one-pass form
(flowkern.jvp(grad=True)) and with a differentiable tangent in the loss (tangent_grad=True, as lsd's ∂_sΦ)."""
from __future__ import annotations

import os

import pytest
import torch
from spawned import leave, spawn_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)


def _one_pass_step(model, opt, x, e, t, r, tangent_grad: bool):
    """u and du/dt from one forward; "one_pass": ‖u − sg(v − (t − r)·du/dt)‖²; "tangent_grad": + ‖du/dt‖²·0.1
    with the gradient through du/dt too."""
    import flowkern

    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    u, dudt = flowkern.jvp(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), grad=True,
                           tangent_grad=tangent_grad)
    loss = (u - (v - (t - r)[:, None] * dudt.detach())).square().sum(-1).mean()
    if tangent_grad:
        loss = loss + 0.1 * dudt.square().sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _train(model, form: str, rank: int = 0, world: int = 1):
    import ddp_worker

    if form == "two_pass":
        return ddp_worker.train(model, rank, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = ddp_worker.BATCH // world
    for step in range(ddp_worker.STEPS):
        batch = [b[rank * per:(rank + 1) * per] for b in ddp_worker.global_batch(step)]
        _one_pass_step(model, opt, *batch, tangent_grad=form == "tangent_grad")
    return model


def _worker(rank: int, world: int, port: int, out_path: str, form: str):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import ddp_worker

        import flowkern

        torch.set_num_threads(1)
        model = ddp_worker.make_model()
        for block in model.blocks:
            fsdp.fully_shard(block)
        fsdp.fully_shard(model)
        sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
        with flowkern.use_backend("torch"):
            _train(model, form, rank, world)
        full = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])   # every rank gathers
        torch.save({"params": full, "sharded": sharded}, f"{out_path}.{rank}")
        leave()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("form", ["two_pass", "one_pass", "tangent_grad"])
def test_fsdp2_meanflow_steps_match_one_process(tmp_path, form):
    import ddp_worker

    import flowkern

    with flowkern.use_backend("torch"):
        single = ddp_worker.flat_params(_train(ddp_worker.make_model(), form))
    start = ddp_worker.flat_params(ddp_worker.make_model())
    spawn_ranks(_worker, 2, str(tmp_path / "fsdp"), form)
    ranks = [torch.load(tmp_path / f"fsdp.{r}") for r in range(2)]
    assert all(r["sharded"] for r in ranks)                       # the parameters really were sharded
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["params"], single, rtol=1e-5, atol=1e-6)
    assert (single - start).abs().max() > 1e-3                    # the steps moved the weights
