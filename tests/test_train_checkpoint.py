"""Checkpoint files: format 2, clear errors for older and foreign checkpoints."""
from __future__ import annotations

import pytest
import torch

from flowkern.train import checkpoint
from flowkern.train.rebuild import restore


def test_save_writes_format_2_atomically(tmp_path):
    path = checkpoint.save(tmp_path / "a" / "ck.pt", {k: 0 for k in checkpoint.ENGINE_KEYS})
    assert torch.load(path, weights_only=True)["format"] == 2
    assert not (tmp_path / "a" / "ck.pt.tmp").exists()
    assert checkpoint.load(path)["step"] == 0


def test_older_and_foreign_checkpoints_are_named(tmp_path):
    torch.save({"format": "flowkern.train/1", "method": "fm"}, tmp_path / "old.pt")
    with pytest.raises(checkpoint.CheckpointError, match="format 'flowkern.train/1'; this flowkern reads format 2"):
        checkpoint.load(tmp_path / "old.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a flowkern training checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    partial = {k: 0 for k in checkpoint.ENGINE_KEYS if k not in ("ema", "rng")}
    checkpoint.save(tmp_path / "partial.pt", partial)
    with pytest.raises(checkpoint.CheckpointError, match="lacks 'ema', 'rng'"):
        checkpoint.load(tmp_path / "partial.pt")
    with pytest.raises(checkpoint.CheckpointError, match="lacks 'arch', 'data'"):
        restore({"format": 2, **{k: 0 for k in checkpoint.ENGINE_KEYS}})
    with pytest.raises(checkpoint.CheckpointError, match="written by method 'fm', not 'ct'"):
        checkpoint.save(tmp_path / "fm.pt", {**{k: 0 for k in checkpoint.ENGINE_KEYS}, "method": "fm"})
        checkpoint.load(tmp_path / "fm.pt", method="ct")


class _Payload:
    """An object whose unpickling runs code (it would create `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_code_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    state = {k: 0 for k in checkpoint.ENGINE_KEYS}
    state["format"] = 2
    state["losses"] = [_Payload(marker)]
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="could not be read"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_real_run_checkpoint_holds_only_plain_data(tmp_path):
    """Everything a training checkpoint needs loads with weights_only=True (numpy's RNG state as a tensor too)."""
    import flowkern
    from flowkern.__main__ import main

    out = tmp_path / "run"
    with flowkern.use_backend("torch"):
        assert main(["train", "fm", "--steps", "2", "--samples", "64", "--out", str(out), "--no-progress",
                     "--no-nll"]) == 0
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["format"] == 2 and state["step"] == 2
