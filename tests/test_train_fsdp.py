"""FSDP2 training (`TrainConfig(fsdp=True)`, `flowkern train --fsdp`) on CPU with gloo, 2 processes: the weights of
one process on the doubled batch, full-tensor checkpoints that resume sharded and evaluate in one process, and the
JVP and EMA-target paths of the CLI's methods equal to the same run under DDP."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from spawned import leave, spawn_ranks

from flowkern.train import fsdp

if not fsdp.available():
    pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)

STEPS, BATCH = 6, 16
TINY = ["--data", "8gaussians", "--batch", "16", "--hidden", "16", "--depth", "2", "--time-dim", "8", "--samples",
        "64", "--no-nll", "--no-progress", "--warmup", "1", "--log-every", "1", "--threads", "1"]


def _join(rank: int, world: int, port: int) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _trainer(batch: int, steps: int, use_fsdp: bool, critic: bool = False):
    from helpers import Regression, WithCritic, engine_net

    from flowkern.data import get_dataset
    from flowkern.train import TrainConfig, Trainer

    config = TrainConfig(steps=steps, batch=batch, lr=1e-2, warmup=2, ema_decays=(0.9,), eval_ema=0.9,
                         fsdp=use_fsdp)
    method = WithCritic(engine_net()) if critic else Regression(engine_net())
    return Trainer(method, get_dataset("8gaussians").sample, config, progress=False, device=torch.device("cpu"))


def _engine_worker(rank: int, world: int, port: int, out: str, critic: bool):
    """FSDP: STEPS steps in one go, and STEPS/2 + a resume from the checkpoint + STEPS/2."""
    _join(rank, world, port)
    from helpers import one_thread

    import flowkern

    try:
        with flowkern.use_backend("torch"), one_thread():
            straight = _trainer(BATCH, STEPS, True, critic)
            losses = straight.fit()
            sharded = all(type(p).__name__ == "DTensor" for p in straight.method.model.parameters())
            state = straight.state_dict()
            eval_params = [p.clone() for p in straight.eval_model().parameters()]
            first = _trainer(BATCH, STEPS // 2, True, critic)
            first.fit()
            half = first.state_dict()
            resumed = _trainer(BATCH, STEPS, True, critic)
            resumed.load(half)
            resumed.fit()
            resumed_state = resumed.state_dict()
        torch.save({"losses": losses, "sharded": sharded, "state": state, "eval": eval_params,
                    "resumed": resumed_state}, f"{out}.{rank}")
        leave()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("critic", [False, True], ids=["model", "with_auxiliary"])
def test_fsdp_matches_one_process_with_the_doubled_batch_and_resumes(tmp_path, monkeypatch, critic):
    from helpers import one_thread

    import flowkern

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with flowkern.use_backend("torch"), one_thread():
        single = _trainer(2 * BATCH, STEPS, False, critic)
        single_losses = single.fit()
        reference = single.state_dict()
        single_eval = list(single.eval_model().parameters())
    spawn_ranks(_engine_worker, 2, str(tmp_path / "f"), critic)
    ranks = [torch.load(tmp_path / f"f.{r}", weights_only=False) for r in range(2)]
    assert all(r["sharded"] for r in ranks)                  # the model really was sharded
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    for r in ranks:
        state = r["state"]
        # the checkpoint holds full tensors: weights, EMA and optimiser moments as one process's
        for key, value in reference["method_state"].items():
            assert type(state["method_state"][key]) is torch.Tensor, key
            torch.testing.assert_close(state["method_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        for a, b in zip(state["ema"]["shadow"]["0.9"], reference["ema"]["shadow"]["0.9"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for name, opt in reference["optimizers"].items():
            for index, entry in opt["state"].items():
                for k, v in entry.items():
                    torch.testing.assert_close(state["optimizers"][name]["state"][index][k], v, rtol=1e-4,
                                               atol=1e-6, msg=f"{name} {index} {k}")
        for a, b in zip(r["eval"], single_eval):                # the eval copy: whole, with the EMA weights
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # half the steps, a sharded resume from the full checkpoint, the other half: the straight run
        for key, value in state["method_state"].items():
            torch.testing.assert_close(r["resumed"]["method_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert single_losses[-1] < 0.9 * single_losses[0]           # the steps moved the weights


def _cli_worker(rank: int, world: int, port: int, argv: list, code_path: str):
    _join(rank, world, port)
    import flowkern
    from flowkern.__main__ import main

    with flowkern.use_backend("torch"):
        code = main(argv)
    with open(f"{code_path}.{rank}", "w") as f:
        f.write(str(code))
    leave()


def _spawn_cli(tmp_path, argv: list, tag: str) -> list[int]:
    spawn_ranks(_cli_worker, 2, argv, str(tmp_path / tag))
    return [int((tmp_path / f"{tag}.{r}").read_text()) for r in range(2)]


@pytest.mark.parametrize("method, extra", [("meanflow", []), ("shortcut", ["--shortcut-target-ema"])],
                         ids=["meanflow_jvp", "shortcut_ema_target"])
def test_cli_fsdp_run_equals_the_ddp_run_and_evaluates_in_one_process(tmp_path, monkeypatch, method, extra):
    """meanflow: flowkern.jvp (one pass) through the sharded model; shortcut --shortcut-target-ema: an EMA target sharded like it."""
    from helpers import one_thread

    import flowkern
    from flowkern.__main__ import main
    from flowkern.train import checkpoint

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    runs = {}
    for mode, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        out = tmp_path / mode
        argv = ["train", method, "--out", str(out), "--steps", "3", *TINY, *extra, *flags]
        assert _spawn_cli(tmp_path, argv, mode) == [0, 0]
        runs[mode] = checkpoint.load(out / "checkpoint.pt")
        assert (out / "quality.json").is_file()
    assert runs["fsdp"]["run"]["fsdp"] is True and runs["ddp"]["run"]["fsdp"] is False
    for key, value in runs["ddp"]["method_state"].items():
        torch.testing.assert_close(runs["fsdp"]["method_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(runs["fsdp"]["ema"]["shadow"].values(), runs["ddp"]["ema"]["shadow"].values()):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    if method == "shortcut":
        assert any(k.startswith("target.") for k in runs["fsdp"]["method_state"])
    with flowkern.use_backend("torch"), one_thread():
        assert main(["eval", str(tmp_path / "fsdp" / "checkpoint.pt"), "--steps", "1", "--samples", "32"]) == 0


def test_fsdp_needs_a_distributed_launch(tmp_path, monkeypatch, capsys):
    from helpers import Regression, engine_net

    from flowkern.__main__ import main
    from flowkern.train import TrainConfig, Trainer

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TypeError, match="fsdp must be a bool"):
        TrainConfig(fsdp="yes")
    with pytest.raises(ValueError, match="fsdp shards the model across processes: launch with torchrun"):
        Trainer(Regression(engine_net()), lambda n, g: torch.randn(n, 2, generator=g), TrainConfig(fsdp=True),
                progress=False)
    assert main(["train", "fm", "--out", str(tmp_path / "x"), "--steps", "1", *TINY, "--fsdp"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowkern: error")]
    assert len(errors) == 1 and "fsdp shards the model across processes" in errors[0], errors
