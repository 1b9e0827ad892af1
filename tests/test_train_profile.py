"""`flowkern train ... --profile N`: a torch.profiler trace of N steps after one warm-up step."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import Regression, engine_net, one_thread

import flowkern
from flowkern.__main__ import main
from flowkern.data import get_dataset
from flowkern.train import TrainConfig, Trainer
from flowkern.train.profile import profile_steps


def _trainer(steps):
    config = TrainConfig(steps=steps, batch=8, warmup=1, ema_decays=(0.9,), eval_ema=0.9)
    return Trainer(Regression(engine_net()), get_dataset("8gaussians").sample, config, progress=False,
                   device=torch.device("cpu"))


def test_trace_holds_the_traced_steps_only(tmp_path):
    with flowkern.use_backend("torch"), one_thread():
        trainer = _trainer(5)
        with profile_steps(trainer, 2, tmp_path) as paths:
            trainer.fit()
    assert trainer.step_hooks == []                                  # the hook is removed with the block
    trace = json.loads(paths["trace"].read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#1", "ProfilerStep#2"]             # step 0 is the warm-up, 3 and 4 untraced
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "Optimizer.step#AdamW.step" in names or any("AdamW" in str(n) for n in names)
    assert "Self CPU" in paths["table"].read_text()


def test_profile_steps_are_validated():
    trainer = _trainer(1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            with profile_steps(trainer, bad, "unused"):
                pass


def test_cli_profile_flag_is_validated(capsys):
    assert_exit = pytest.raises(SystemExit)
    with assert_exit as exc:
        main(["train", "fm", "--profile", "-1"])
    assert exc.value.code == 2
    assert "flowkern: error: argument --profile: must be >= 0, got -1" in capsys.readouterr().err


def test_cli_writes_the_trace_into_the_run_directory(tmp_path):
    out = tmp_path / "fm"
    tiny = ["--steps", "4", "--batch", "16", "--hidden", "8", "--depth", "1", "--samples", "100", "--no-nll",
            "--no-progress", "--warmup", "1"]
    with flowkern.use_backend("torch"), one_thread():
        assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), "--profile", "2", *tiny]) == 0
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    assert sum(e.get("name", "").startswith("ProfilerStep#") for e in events) == 2
    assert (out / "profile.txt").exists() and (out / "checkpoint.pt").exists()
