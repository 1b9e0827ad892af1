"""Checkpoint files: format 2, clear errors for older and foreign checkpoints."""
from __future__ import annotations

import pytest
import torch

from flowkern.train import checkpoint
from flowkern.train.rebuild import restore


def test_save_writes_format_2_atomically(tmp_path):
    path = checkpoint.save(tmp_path / "a" / "ck.pt", {k: 0 for k in checkpoint.ENGINE_KEYS})
    assert torch.load(path, weights_only=False)["format"] == 2
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
