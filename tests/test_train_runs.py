"""`flowkern train` under faults and on resume: signals, a kill after the final save, the stored run on --resume,
the divergence stop, the run lock, and bad input refused before anything is written."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from cli_helpers import TINY, fast_cli, with_flag  # noqa: F401  (fast_cli: autouse)
from helpers import one_thread, torch_backend

from flowkern.__main__ import main
from flowkern.train import checkpoint



@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fm"
    with torch_backend(), one_thread():
        assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), *TINY]) == 0
    return out


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigint_saves_says_how_to_resume_and_the_resume_finishes(tmp_path, monkeypatch, capsys):
    from flowkern.train.loop import Trainer

    real = Trainer._step

    def step(self):
        if self.step_count == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "_step", step)
    out = tmp_path / "fm"
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), *TINY]) == 130
    err = capsys.readouterr().err
    assert "SIGINT: stopped after step 3; checkpoint saved to" in err
    assert f"resume with: flowkern train fm --out {out} --resume" in err
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 3 and not (out / "quality.json").exists()
    monkeypatch.setattr(Trainer, "_step", real)
    assert main(["train", "fm", "--out", str(out), "--resume"]) == 0      # the stored settings, nothing else
    assert "resuming" in capsys.readouterr().out
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == 6 and state["arch"]["hidden"] == 16 and state["data"] == "8gaussians"
    assert _steps(out) == [2, 4, 6] and (out / "quality.json").is_file()


def test_a_kill_after_the_final_save_is_finished_by_resume(fm_run, tmp_path, capsys):
    out = tmp_path / "killed"
    shutil.copytree(fm_run, out)
    (out / "quality.json").unlink()
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["train", "fm", "--out", str(out), "--resume"]) == 0
    assert "SW2@1" in capsys.readouterr().out
    quality = json.loads((out / "quality.json").read_text())
    assert quality["steps"] == 6 and set(quality["rows"]["fm (EMA)"]) == {"1", "2", "4", "8", "100"}
    assert (out / "checkpoint.pt").read_bytes() == before                 # no step trained again
    assert main(["train", "fm", "--out", str(out), "--resume"]) == 2
    assert "complete at step 6 and evaluated" in capsys.readouterr().err


def test_resume_continues_the_same_run(tmp_path, capsys):
    """ct started with non-default schedule and coupling comes back with them; a conflicting flag is an error, a
    changeable one is logged."""
    out = tmp_path / "ct"
    args = ["train", "ct", "--data", "8gaussians", "--out", str(out), *with_flag(TINY, "--steps", "2")]
    assert main([*args, "--ct-schedule", "ict", "--ct-coupling", "independent", "--lr", "0.003"]) == 0
    capsys.readouterr()
    for flag, value, message in [("--lr", "0.01", "--lr 0.01 conflicts with the run's 0.003"),
                                 ("--ema", "0.9", "--ema 0.9 conflicts with the run's 0.99 0.999"),
                                 ("--hidden", "32", "--hidden 32 conflicts with the run's 16"),
                                 ("--optimizer", "radam", "--optimizer radam conflicts"),
                                 ("--ct-schedule", "ect", "--ct-schedule ect conflicts with the run's ict")]:
        assert main(["train", "ct", "--out", str(out), "--resume", "--steps", "3", flag, value]) == 2, flag
        assert message in capsys.readouterr().err
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 2
    assert main(["train", "ct", "--out", str(out), "--resume", "--steps", "3", "--lr", "0.003", "--no-eval"]) == 0
    assert "changed: steps: 2 → 3; eval: True → False" in capsys.readouterr().out
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == 3
    assert (state["method_kwargs"]["schedule"], state["method_kwargs"]["coupling"]) == ("ict", "independent")
    assert state["method_kwargs"]["total_steps"] == 3 and state["run"]["lr"] == 0.003
    assert "schedule = \"ict\"" in (out / "config.toml").read_text()


def test_a_checkpoint_from_before_coupling_resumes_and_rebuilds_with_independent_noise(tmp_path):
    """ct trained with independent noise before `coupling` existed; its checkpoint lacks the setting, and today's
    default ("ot") would change the run on resume and the sampler's re-noising on eval."""
    from flowkern.train.rebuild import restore

    out = tmp_path / "ct"
    assert main(["train", "ct", "--data", "8gaussians", "--out", str(out), "--no-eval",
                 *with_flag(TINY, "--steps", "2")]) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["method_kwargs"].pop("coupling") == "ot"
    checkpoint.save(out / "checkpoint.pt", state)
    assert restore(checkpoint.load(out / "checkpoint.pt"))[0].coupling == "independent"
    assert main(["train", "ct", "--out", str(out), "--resume", "--steps", "3", "--no-eval"]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["method_kwargs"]["coupling"] == "independent"


def test_divergence_ends_with_a_message_and_status_1(tmp_path, monkeypatch, capsys):
    from flowkern.methods.flow_matching import FlowMatching

    real = FlowMatching.loss
    monkeypatch.setattr(FlowMatching, "loss", lambda self, net, x0, step: (
        real(self, net, x0, step)[0] * float("nan"), {}))
    out = tmp_path / "nan"
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), "--max-consecutive-skips", "4",
                 *with_flag(TINY, "--steps", "60")]) == 1
    err = capsys.readouterr().err
    assert "flowkern: error: stopped at step 4: 4 consecutive steps skipped" in err
    assert not (out / "quality.json").exists()
    monkeypatch.setattr(FlowMatching, "loss", lambda self, net, x0, step: (
        real(self, net, x0, step)[0] * (float("nan") if step == 1 else 1.0), {}))
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(tmp_path / "one"), "--no-eval", *TINY]) == 0
    assert "6 steps in" in (out := capsys.readouterr().out) and "(1 skipped)" in out


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    from flowkern.train.run_dir import RunLock

    out = tmp_path / "busy"
    with RunLock(out):
        assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), *TINY]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def _refused(argv, message, capsys, out=None):
    code = None
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, (argv, err)
    assert err.startswith("flowkern: error: ") and err.count("\n") == 1
    if out is not None:
        assert not out.exists() or not any(p.name != ".keep" for p in out.iterdir())


def test_bad_input_is_refused_before_anything_is_written(fm_run, tmp_path, capsys, monkeypatch):
    new = tmp_path / "new"
    base = ["train", "fm", "--data", "8gaussians", *TINY]
    (tmp_path / "file").write_text("x")
    _refused([*base, "--out", str(tmp_path / "file")], "is an existing file, not a directory", capsys)
    _refused(["train", "fm", "--hidden", "1000000", "--out", str(new)], "training it needs about", capsys, new)
    _refused([*base, "--out", str(new), "--samples", "1"], "pass at least 2", capsys, new)
    _refused(["train", "ct", "--nll", "--out", str(new)], "--nll: method 'ct' has no velocity", capsys, new)
    _refused([*base, "--out", str(new), "--device", "cuda:99"], "cuda", capsys, new)
    text = tmp_path / "teacher.txt"
    text.write_text("not a checkpoint\n" * 50)
    cd = ["train", "cd", "--data", "8gaussians", *TINY, "--out", str(new)]
    _refused([*cd, "--teacher", str(text)], "could not be read", capsys, new)
    _refused([*cd, "--teacher", str(tmp_path)], "is a directory, not a checkpoint file", capsys, new)
    _refused(["train", "pd", "--data", "8gaussians", *TINY, "--out", str(new), "--teacher",
              str(fm_run / "checkpoint.pt"), "--hidden", "64"], "pd starts from the teacher", capsys, new)
    monkeypatch.setattr("flowkern.train.metrics_log.tensorboard_available", lambda: False)
    _refused([*base, "--out", str(new), "--tensorboard"], "--tensorboard needs the tensorboard package", capsys, new)
    monkeypatch.setattr("flowkern.train.run_dir.os.access", lambda path, mode: False)
    _refused([*base, "--out", str(new)], "(read-only or no permission)", capsys, new)
    monkeypatch.undo()
    state = checkpoint.load(fm_run / "checkpoint.pt")
    wrong = dict(state, arch={**state["arch"], "hidden": 32})
    checkpoint.save(tmp_path / "wrong.pt", wrong)
    _refused(["eval", str(tmp_path / "wrong.pt")], "does not fit the architecture it records", capsys)
    checkpoint.save(tmp_path / "partial.pt", {k: v for k, v in state.items() if k != "arch"})
    _refused(["sample", str(tmp_path / "partial.pt"), "--out", str(tmp_path / "s.pt")], "lacks 'arch'", capsys)
    assert not (tmp_path / "s.pt").exists() and not new.exists()


def test_nonsense_gets_a_warning(fm_run, tmp_path, capsys):
    assert main(["train", "fm", "--data", "8gaussians", *with_flag(TINY, "--samples", "20"), "--warmup", "1000",
                 "--out", str(tmp_path / "a"), "--no-eval"]) == 0
    err = capsys.readouterr().err
    assert "warning: --warmup 1000 >= --steps 6" in err
    assert main(["train", "pd", "--data", "8gaussians", *with_flag(TINY, "--steps", "3"), "--no-eval", "--teacher",
                 str(fm_run / "checkpoint.pt"), "--out", str(tmp_path / "pd")]) == 0
    err = capsys.readouterr().err
    assert "warning: pd: --steps 3 leaves less than 1 optimiser step(s) for each of its 7 halving rounds" in err
    assert main(["train", "fm", "--data", "8gaussians", *with_flag(TINY, "--samples", "20"),
                 "--out", str(tmp_path / "b")]) == 0
    assert "warning: --samples 20" in capsys.readouterr().err


def test_pd_records_the_architecture_it_trains(fm_run, tmp_path):
    out = tmp_path / "pd"
    argv = ["train", "pd", "--data", "8gaussians", *with_flag(with_flag(TINY, "--steps", "2"), "--hidden", "16"),
            "--no-eval", "--teacher", str(fm_run / "checkpoint.pt"), "--out", str(out)]
    argv.remove("--hidden")
    argv.remove("16")
    assert main(argv) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["arch"]["hidden"] == 16 and state["run"]["hidden"] == 16 and state["run"]["depth"] == 1
    assert "hidden = 16" in (out / "config.toml").read_text()


def test_a_full_disk_at_the_final_save_keeps_the_last_periodic_checkpoint(tmp_path, monkeypatch, capsys):
    real = checkpoint._write
    calls = []

    def fills_up(state, file):
        calls.append(state["step"])
        if state["step"] == 6:
            file.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        real(state, file)

    monkeypatch.setattr(checkpoint, "_write", fills_up)
    out = tmp_path / "fm"
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), "--checkpoint-every", "2", *TINY]) == 1
    err = capsys.readouterr().err
    assert f"flowkern: error: could not write the checkpoint '{out / 'checkpoint.pt'}': no space left on device; " \
           "the previous checkpoint.pt is kept" in err
    assert calls == [2, 4, 6] and checkpoint.load(out / "checkpoint.pt")["step"] == 4
    assert not (out / "checkpoint.pt.tmp").exists()
    monkeypatch.setattr(checkpoint, "_write", real)
    assert main(["train", "fm", "--out", str(out), "--resume"]) == 0       # space freed: the run finishes
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 6
