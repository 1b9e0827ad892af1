"""The engine under faults: signals finish the step and save, periodic checkpoints, the divergence stop, no host
synchronisation per step, one run per metrics log, one run per directory."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from helpers import Regression, engine_net, one_thread, torch_backend

from flowkern.data import get_dataset
from flowkern.methods.flow_matching import FlowMatching
from flowkern.train import TrainConfig, Trainer, checkpoint
from flowkern.train.stops import TrainingDiverged, TrainingInterrupted


@pytest.fixture(autouse=True)
def _fast():
    with torch_backend(), one_thread():
        yield


def _config(**kw):
    defaults = dict(steps=8, batch=32, lr=3e-3, warmup=2, ema_decays=(0.9,), eval_ema=0.9, log_every=2)
    return TrainConfig(**{**defaults, **kw})


class _SignalAt:
    """The 8gaussians sampler, sending `signum` to this process while drawing the batch of step `at` (0-based)."""

    def __init__(self, at: int, signum=signal.SIGINT):
        self.at, self.signum, self.calls = at, signum, 0
        self.data = get_dataset("8gaussians").sample

    def __call__(self, n, generator):
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        self.calls += 1
        return self.data(n, generator)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_the_run_resumes_exactly(tmp_path, signum):
    straight = Trainer(FlowMatching(engine_net()), get_dataset("8gaussians").sample, _config(), progress=False)
    straight.fit()
    trainer = Trainer(FlowMatching(engine_net()), _SignalAt(3, signum), _config(), out_dir=tmp_path, progress=False)
    handler = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    stop = info.value
    assert stop.step == 4 and stop.exit_code == 128 + signum          # step 4 (index 3) was finished
    assert f"{signal.Signals(signum).name}: stopped after step 4; checkpoint saved to" in str(stop)
    assert signal.getsignal(signum) is handler                        # the handlers are restored
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 4
    resumed = Trainer(FlowMatching(engine_net(seed=9)), get_dataset("8gaussians").sample, _config(),
                      out_dir=tmp_path, progress=False)
    resumed.load(state)
    resumed.fit()
    assert resumed.losses == straight.losses                          # nothing lost, nothing repeated
    for p, q in zip(resumed.method.parameters(), straight.method.parameters()):
        assert torch.equal(p, q)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_periodic_checkpoints_are_on_by_default(tmp_path, monkeypatch):
    assert (TrainConfig().checkpoint_every, TrainConfig().checkpoint_minutes) == (500, 10.0)
    saved = []
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, state: (saved.append(state["step"]), real(path, state))[1])
    Trainer(Regression(engine_net()), get_dataset("8gaussians").sample, _config(steps=7, checkpoint_every=3),
            out_dir=tmp_path, progress=False).fit()
    assert saved == [3, 6, 7]
    saved.clear()                                                     # by time: one minute passes every step
    clock = iter(range(0, 10_000, 61))
    monkeypatch.setattr("flowkern.train.loop.time.monotonic", lambda: next(clock))
    Trainer(Regression(engine_net()), get_dataset("8gaussians").sample,
            _config(steps=4, checkpoint_every=0, checkpoint_minutes=1.0), out_dir=tmp_path / "b", progress=False).fit()
    assert saved == [1, 2, 3, 4]


def test_consecutive_skipped_steps_end_the_run():
    """A NaN in every batch: the guard skips each step, and after max_consecutive_skips in a row the run stops
    (read at the metrics line); isolated bad steps never stop it."""
    always = Regression(engine_net(), nan_at=range(100))
    trainer = Trainer(always, get_dataset("8gaussians").sample, _config(steps=50, max_consecutive_skips=5,
                                                                        log_every=1), progress=False)
    with pytest.raises(TrainingDiverged, match="stopped at step 5: 5 consecutive steps skipped .*5 skipped in all"):
        trainer.fit()
    late = Trainer(Regression(engine_net(), nan_at=range(100)), get_dataset("8gaussians").sample,
                   _config(steps=50, max_consecutive_skips=5, log_every=4), progress=False)
    with pytest.raises(TrainingDiverged, match="stopped at step 8: 8 consecutive"):
        late.fit()                                                    # noticed at the next line (step 8)
    sporadic = Trainer(Regression(engine_net(), nan_at=range(0, 40, 2)), get_dataset("8gaussians").sample,
                       _config(steps=40, max_consecutive_skips=2, log_every=1), progress=False)
    sporadic.fit()
    assert sporadic.skipped == 20 and sporadic.step_count == 40
    never = Trainer(Regression(engine_net(), nan_at=range(100)), get_dataset("8gaussians").sample,
                    _config(steps=30, max_consecutive_skips=0), progress=False)
    never.fit()
    assert never.skipped == 30


_ENGINE_FILES = ("flowkern/train/loop.py", "flowkern/train/ema.py", "flowkern/_ema.py", "flowkern/train/distributed.py")


def _host_reads(monkeypatch, run) -> int:
    """How often the engine's own code reads a tensor back to the host while `run()` runs."""
    import sys

    count = [0]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kw):
            caller = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
            if caller.endswith(_ENGINE_FILES):
                count[0] += 1
            return _original(self, *args, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    run()
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("optimizer", ["adamw", "radam"])
def test_no_host_synchronisation_per_step(monkeypatch, optimizer):
    """The NaN/Inf guard, optimiser step, EMA and skip counters stay on the device: 4 or 16 steps with one metrics
    line at the end read the device equally often (and a bad step is still skipped)."""
    def reads(steps):
        method = Regression(engine_net(), nan_at=(1,))
        trainer = Trainer(method, get_dataset("8gaussians").sample,
                          _config(steps=steps, log_every=1000, optimizer=optimizer), progress=False)
        n = _host_reads(monkeypatch, trainer.fit)
        assert trainer.skipped == 1
        return n

    few, many = reads(4), reads(16)
    assert few == many and few > 0


def test_skipped_step_is_undone_for_an_unfused_optimizer():
    """RAdam has no fused kernel: a skipped step takes back its parameters and state exactly."""
    trainer = Trainer(Regression(engine_net(), nan_at=(3,)), get_dataset("8gaussians").sample,
                      _config(steps=3, optimizer="radam", warmup=0), progress=False)
    assert not trainer.optimizer.defaults.get("fused")
    trainer.fit()
    params = [p.detach().clone() for p in trainer.params]
    state = {k: v.clone() for k, v in trainer.optimizer.state[trainer.params[0]].items()}
    trainer.fit(4)
    assert trainer.skipped == 1
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, params))
    assert all(torch.equal(v, state[k]) for k, v in trainer.optimizer.state[trainer.params[0]].items())


def test_metrics_log_holds_one_run(tmp_path):
    """A fresh run in a directory starts the log over; a resumed run cuts it back to the checkpoint's step."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 825, "loss": 1.0}\n')
    trainer = Trainer(Regression(engine_net()), get_dataset("8gaussians").sample, _config(steps=6),
                      out_dir=tmp_path, progress=False)
    trainer.fit(4)
    state = trainer.state_dict()
    trainer.fit()                                                      # to 6, then "killed"; resume from step 4
    again = Trainer(Regression(engine_net()), get_dataset("8gaussians").sample, _config(steps=8),
                    out_dir=tmp_path, progress=False)
    again.load(state)
    again.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_one_run_per_directory(tmp_path):
    from flowkern.train.run_dir import RunDirError, RunLock

    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):                                            # released at the end of the first
        pass


def test_a_signal_in_the_last_step_still_reports_the_stop_after_the_final_save(tmp_path):
    trainer = Trainer(Regression(engine_net()), _SignalAt(7, signal.SIGTERM), _config(), out_dir=tmp_path,
                      progress=False)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.step == 8 and checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 8
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
