"""DDP on CPU (gloo, 2 processes): the same loss curve and weights as one process with the doubled batch."""
from __future__ import annotations

import os

import torch
from spawned import leave, spawn_ranks

STEPS, BATCH = 8, 32


def _run(batch: int, out_path: str, critic: bool = False, end=None):
    """Train the deterministic Regression method (with `critic`: WithCritic, which has an auxiliary network);
    returns (losses, params) and saves them (every rank)."""
    from helpers import Regression, WithCritic, one_thread, engine_net

    import flowkern
    from flowkern.data import get_dataset
    from flowkern.train import TrainConfig, Trainer

    with flowkern.use_backend("torch"), one_thread():
        config = TrainConfig(steps=STEPS, batch=batch, lr=1e-2, warmup=2, ema_decays=(0.9,), eval_ema=0.9)
        method = WithCritic(engine_net()) if critic else Regression(engine_net())
        # gloo on the CPU for every rank, also on a machine with one GPU (where rank 1 would ask for cuda:1)
        trainer = Trainer(method, get_dataset("8gaussians").sample, config, progress=False,
                          device=torch.device("cpu"))
        losses = trainer.fit()
    params = [p.detach().clone() for p in trainer.method.parameters()]
    torch.save({"losses": losses, "params": params, "world": trainer.world, "ddp": type(trainer.net).__name__},
               f"{out_path}.{trainer.rank}")
    if end is not None:
        end()   # a rank of a multi-process run: leaves with its trainer (and DDP wrapper) alive
    return losses, params


def _worker(rank: int, world: int, port: int, out_path: str, critic: bool = False):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        _run(BATCH, out_path, critic, end=leave)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_ddp_matches_single_process_with_doubled_batch(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single_losses, single_params = _run(2 * BATCH, str(tmp_path / "single"))
    spawn_ranks(_worker, 2, str(tmp_path / "ddp"))
    ranks = [torch.load(tmp_path / f"ddp.{r}") for r in range(2)]
    assert all(r["world"] == 2 and r["ddp"] == "DistributedDataParallel" for r in ranks)
    # the logged loss is the mean over ranks = the loss of the doubled batch
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single_losses), rtol=1e-4, atol=1e-6)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for a, b, c in zip(ranks[0]["params"], ranks[1]["params"], single_params):
        assert torch.equal(a, b)                    # all-reduced gradients keep the ranks identical
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    # the loss moved: the test would notice unsynchronised or missing updates
    assert single_losses[-1] < 0.9 * single_losses[0]


def test_ddp_auxiliary_network_matches_single_process(tmp_path, monkeypatch):
    """An auxiliary network outside DDP: its gradients are averaged over the ranks, so both ranks hold the same
    weights, equal to one process with the doubled batch."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single_losses, single_params = _run(2 * BATCH, str(tmp_path / "single"), critic=True)
    spawn_ranks(_worker, 2, str(tmp_path / "ddp"), True)
    ranks = [torch.load(tmp_path / f"ddp.{r}") for r in range(2)]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single_losses), rtol=1e-4, atol=1e-6)
    assert len(single_params) == len(ranks[0]["params"]) > 2       # the model's and the critic's parameters
    for a, b, c in zip(ranks[0]["params"], ranks[1]["params"], single_params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def _mean_worker(rank: int, world: int, port: int, out_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from flowkern.train.loop import _mean_gradients_over_ranks

        params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)),
                  torch.nn.Parameter(torch.zeros(1))]
        params[0].grad = torch.full((2, 3), float(rank + 1))
        params[1].grad = torch.arange(4.0) * (rank + 1)          # params[2] has no gradient: left alone
        _mean_gradients_over_ranks(params)
        torch.save([params[0].grad, params[1].grad, params[2].grad], f"{out_path}.{rank}")
        leave()
    finally:
        torch.distributed.destroy_process_group()


def test_auxiliary_gradients_are_averaged_over_ranks(tmp_path):
    """An auxiliary network (e.g. CTM's discriminator) is outside the DDP wrapper: the engine all-reduces its
    gradients explicitly (the mean over ranks)."""
    spawn_ranks(_mean_worker, 2, str(tmp_path / "g"))
    for rank in range(2):
        a, b, c = torch.load(tmp_path / f"g.{rank}")
        assert torch.equal(a, torch.full((2, 3), 1.5)) and torch.equal(b, torch.arange(4.0) * 1.5) and c is None


def _faulty_rank_worker(rank: int, world: int, port: int, out_path: str, fault: str):
    """Rank 1 misbehaves while drawing the batch of step 3 — "freeze": it sleeps past the 2 s timeout; "sigterm": it
    alone receives SIGTERM. Every rank records how its run ended."""
    import signal
    import sys
    import time

    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    outcome = "finished"
    try:
        from helpers import Regression, engine_net, one_thread

        import flowkern
        from flowkern.data import get_dataset
        from flowkern.train import TrainConfig, Trainer

        data = get_dataset("8gaussians").sample
        calls = [0]

        def faulty(n, generator):
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                time.sleep(5) if fault == "freeze" else os.kill(os.getpid(), signal.SIGTERM)
            return data(n, generator)

        with flowkern.use_backend("torch"), one_thread():
            config = TrainConfig(steps=20, batch=8, warmup=0, ema_decays=(0.9,), eval_ema=0.9,
                                 ddp_timeout=2.0 if fault == "freeze" else 30.0)
            Trainer(Regression(engine_net()), faulty, config, out_dir=os.path.dirname(out_path),
                    progress=False).fit()
    except Exception as err:   # noqa: BLE001 -- the outcome is the test's result
        outcome = f"{type(err).__name__}: {err}"
    with open(f"{out_path}.{rank}", "w") as f:
        f.write(outcome)
    if fault == "freeze":
        os._exit(0)   # the group is broken: leave without waiting on it
    torch.distributed.destroy_process_group()


def _spawn_faulty(tmp_path, monkeypatch, fault: str) -> list[str]:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    spawn_ranks(_faulty_rank_worker, 2, str(tmp_path / "r"), fault)
    return [(tmp_path / f"r.{r}").read_text() for r in range(2)]


def test_a_frozen_rank_is_named_after_the_timeout(tmp_path, monkeypatch):
    """ddp_timeout: a collective waits that long, then the run fails with a message naming the silent rank."""
    message = _spawn_faulty(tmp_path, monkeypatch, "freeze")[0]
    assert message.startswith("RankTimeout: rank 0: rank 1 (last at step 2) stopped answering"), message
    assert "gave up after 2 s (ddp_timeout)" in message


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, monkeypatch):
    from flowkern.train import checkpoint

    outcomes = _spawn_faulty(tmp_path, monkeypatch, "sigterm")
    assert all(o.startswith("TrainingInterrupted: SIGTERM: stopped after step 5") for o in outcomes), outcomes
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 5 and len(state["rng"]) == 2
