"""`flowkern train | sample | eval`: a tiny end-to-end run, reuse of its checkpoint, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import one_thread, torch_backend

from flowkern.__main__ import main
from flowkern.train import checkpoint

TINY = ["--steps", "6", "--batch", "32", "--hidden", "16", "--depth", "1", "--samples", "300", "--no-nll",
        "--no-progress", "--warmup", "2", "--log-every", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "fm"
    with torch_backend(), one_thread():
        assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(autouse=True)
def _torch_backend():
    with torch_backend(), one_thread():
        yield


def test_train_writes_run(run_dir, capsys):
    for name in ("checkpoint.pt", "metrics.jsonl", "samples.png", "loss.png", "quality.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6] and all(x["skipped"] == 0 for x in lines)
    quality = json.loads((run_dir / "quality.json").read_text())
    assert set(quality["rows"]["fm (EMA)"]) == {"1", "2", "4", "8", "100"}


def test_eval_and_sample_reuse_checkpoint(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir / "checkpoint.pt"), "--steps", "1", "2", "--samples", "200"]) == 0
    out = capsys.readouterr().out
    assert "fm (EMA)" in out and "SW2@2" in out
    target = tmp_path / "x.pt"
    assert main(["sample", str(run_dir / "checkpoint.pt"), "--out", str(target), "--n", "50", "--steps", "2"]) == 0
    x = torch.load(target)
    assert x.shape == (50, 2) and bool(torch.isfinite(x).all())
    assert main(["sample", str(run_dir / "checkpoint.pt"), "--out", str(target)]) == 2   # no overwrite
    assert "already exists" in capsys.readouterr().err


def test_resume_continues(run_dir, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(run_dir, out)
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(out), "--resume",
                 *_with(TINY, "--steps", "8")]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 8


def _with(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("argv, message", [
    (["train", "nope"], "invalid choice: 'nope'"),
    (["train", "fm", "--data", "mnist"], "invalid choice: 'mnist'"),
    (["train", "fm", "--steps", "0"], "must be >= 1"),
    (["train", "fm", "--steps", "-3"], "must be >= 1"),
    (["sample", "x.pt", "--out", "y.pt", "--steps", "0"], "must be >= 1"),
    (["train", "ct", "--dropout", "1"], "must be in [0, 1)"),
])
def test_bad_arguments_exit_nonzero(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_nothing_overwritten(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoint.pt"
    before = ckpt.read_bytes()
    # an existing run without --resume
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(run_dir), *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    # a checkpoint from another method
    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(ckpt, weights_only=False)
    state["method"] = "ct"
    torch.save(state, other / "checkpoint.pt")           # edited by hand: its checksum no longer matches
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(other), "--resume", *TINY]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    checkpoint.save(other / "checkpoint.pt", state)       # a valid checkpoint of another method
    foreign = (other / "checkpoint.pt").read_bytes()
    assert main(["train", "fm", "--data", "8gaussians", "--out", str(other), "--resume", *TINY]) == 2
    assert "written by method 'ct', not 'fm'" in capsys.readouterr().err
    # the dataset must match on resume; --teacher is not for fm; a missing checkpoint
    assert main(["train", "fm", "--data", "checkerboard", "--out", str(run_dir), "--resume", *TINY]) == 2
    assert "trained on '8gaussians'" in capsys.readouterr().err
    assert main(["train", "fm", "--out", str(tmp_path / "t"), "--teacher", str(ckpt), *TINY]) == 2
    assert "--teacher is not used" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(tmp_path / "junk.pt")]) == 2
    assert "could not be read" in capsys.readouterr().err
    assert ckpt.read_bytes() == before and (other / "checkpoint.pt").read_bytes() == foreign
    assert not (tmp_path / "t").exists()


def test_consistency_sigma_data_defaults_to_the_data_std(run_dir, tmp_path):
    """σ_data unset: EDM's σ_data is measured on the training data (≈2.03 for 8 Gaussians, not 0.5); a run file's
    [method] table may set it (a run value: no flag)."""
    from flowkern.data import get_dataset
    from flowkern.train.cli import restore

    out = tmp_path / "cd"
    assert main(["train", "cd", "--data", "8gaussians", "--out", str(out), "--teacher",
                 str(run_dir / "checkpoint.pt"), *_with(TINY, "--steps", "2")]) == 0
    method, _ = restore(torch.load(out / "checkpoint.pt", weights_only=False))
    expected = get_dataset("8gaussians").data_std()
    assert method.sigma_data == pytest.approx(expected) and 1.9 < expected < 2.2
    out2 = tmp_path / "cd2"
    (tmp_path / "run.toml").write_text("[method]\nsigma_data = 0.5\n")
    assert main(["train", "cd", "--data", "8gaussians", "--out", str(out2), "--teacher", str(run_dir / "checkpoint.pt"),
                 "--config", str(tmp_path / "run.toml"), *_with(TINY, "--steps", "2")]) == 0
    assert restore(torch.load(out2 / "checkpoint.pt", weights_only=False))[0].sigma_data == 0.5


def test_ctm_gan_from_the_command_line(run_dir, tmp_path):
    """--ctm-gan: the discriminator is sized from the dataset and its optimiser state is in the checkpoint."""
    from flowkern.train.cli import restore

    out = tmp_path / "ctm"
    assert main(["train", "ctm", "--data", "8gaussians", "--out", str(out), "--teacher", str(run_dir / "checkpoint.pt"),
                 "--ctm-gan", "--ctm-num-scales", "6", *_with(TINY, "--steps", "2")]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    method, _ = restore(state)
    if hasattr(method, "auxiliary_networks"):      # the engine owns the discriminator's optimiser
        assert state["optimizers"]["discriminator"]["state"]
    else:
        assert state["method_state"]["_extra_state"]["d_opt"]["state"]
    assert method.gan and method.discriminator.net[0].in_features == 2


def test_dropout_is_part_of_the_architecture(tmp_path):
    """--dropout: stored with the architecture; the training model drops units, the restored eval model does not."""
    from flowkern.train.cli import restore

    out = tmp_path / "ct"
    assert main(["train", "ct", "--data", "8gaussians", "--out", str(out), "--dropout", "0.3",
                 *_with(TINY, "--steps", "2")]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["arch"]["dropout"] == 0.3
    method, model = restore(state)
    x, t = torch.randn(64, 2), torch.full((64,), 0.5)
    method.model.train()
    assert not torch.equal(method.model(x, t, t), method.model(x, t, t))     # fresh masks each call
    assert not model.training and torch.equal(model(x, t, t), model(x, t, t))


def test_seed_makes_a_run_reproducible(tmp_path):
    """--seed fixes everything random in a run (the initial weights included): the same seed gives bit-identical
    weights, another seed other weights."""
    def weights(name, seed):
        out = tmp_path / name
        assert main(["train", "ct", "--data", "8gaussians", "--out", str(out), "--seed", str(seed),
                     *_with(TINY, "--steps", "3")]) == 0
        return torch.load(out / "checkpoint.pt", weights_only=False)["method_state"]

    first, again, other = weights("a", 7), weights("b", 7), weights("c", 8)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
