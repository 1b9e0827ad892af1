"""Checkpoint integrity: a checksum over the payload, non-finite weights refused, failed writes that keep the last
good file and leave no temporary file behind."""
from __future__ import annotations

import errno

import pytest
import torch

from flowkern.train import checkpoint
from flowkern.train.atomic import WriteError, write_atomically


def _payload(value: float = 1.0) -> dict:
    state = {k: 0 for k in checkpoint.ENGINE_KEYS}
    state["method_state"] = {"model.weight": torch.full((64, 64), value), "model.bias": torch.zeros(64)}
    state["ema"] = {"shadow": {"0.99": [torch.full((64, 64), value)]}}
    return state


def test_the_checksum_covers_every_tensor_byte_and_value(tmp_path):
    path = checkpoint.save(tmp_path / "ck.pt", _payload())
    state = torch.load(path, weights_only=True)
    assert state["checksum"] == checkpoint.payload_digest(state) and len(state["checksum"]) == 64
    assert checkpoint.load(path)["step"] == 0
    changed = dict(state, step=1)
    assert checkpoint.payload_digest(changed) != state["checksum"]
    other = dict(state, method_state={**state["method_state"], "model.bias": torch.zeros(64, dtype=torch.float64)})
    assert checkpoint.payload_digest(other) != state["checksum"]           # the dtype counts, not only the values


def _tensor_offsets(path, count=5):
    """Offsets inside the raw data of the stored tensors (the zip records of `data/`)."""
    import zipfile

    offsets = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size >= 1024:
                with open(path, "rb") as f:
                    f.seek(info.header_offset + 26)
                    name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
                start = info.header_offset + 30 + name_len + extra_len
                offsets += [start + k * info.file_size // count for k in range(count)]
    return offsets[:count]


def test_flipped_bytes_are_detected_at_every_offset(tmp_path):
    path = checkpoint.save(tmp_path / "ck.pt", _payload())
    good = path.read_bytes()
    offsets = _tensor_offsets(path)
    assert len(offsets) == 5
    for offset in offsets:
        damaged = bytearray(good)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(checkpoint.CheckpointError, match="does not match its checksum"):
            checkpoint.load(path)
    edited = torch.load(tmp_path / "ck.pt", weights_only=True)   # re-saved by hand: the old checksum, new content
    edited["step"] = 7
    torch.save(edited, path)
    with pytest.raises(checkpoint.CheckpointError, match="does not match its checksum"):
        checkpoint.load(path)
    del edited["checksum"]
    torch.save(edited, path)
    with pytest.raises(checkpoint.CheckpointError, match="has no checksum"):
        checkpoint.load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    state = _payload()
    state["method_state"]["model.weight"][3, 5] = bad
    path = checkpoint.save(tmp_path / "ck.pt", state)
    with pytest.raises(checkpoint.CheckpointError, match=r"non-finite weights \(method_state.model.weight"):
        checkpoint.load(path)
    state = _payload()
    state["ema"]["shadow"]["0.99"][0][0, 0] = bad
    with pytest.raises(checkpoint.CheckpointError, match=r"ema.shadow.0.99.0 has NaN or Inf"):
        checkpoint.load(checkpoint.save(tmp_path / "ck2.pt", state))


def test_a_full_disk_keeps_the_last_good_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path / "ck.pt", _payload(1.0))
    good = path.read_bytes()

    def full_disk(state, file):
        file.write(b"x" * 4096)                     # part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        checkpoint.save(path, _payload(2.0))
    message = str(info.value)
    assert "could not write the checkpoint" in message and str(path) in message
    assert "no space left on device" in message and "previous ck.pt is kept" in message
    assert path.read_bytes() == good and not (tmp_path / "ck.pt.tmp").exists()
    assert torch.equal(checkpoint.load(path)["method_state"]["model.weight"], torch.ones(64, 64))


def test_torch_s_own_write_failure_is_reported_too(tmp_path, monkeypatch):
    """torch.save reports a failed write as RuntimeError ('PytorchStreamWriter failed writing file'): the same
    clear error."""
    def failing(state, file):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(checkpoint, "_write", failing)
    with pytest.raises(checkpoint.CheckpointWriteError, match="could not write the checkpoint .*file write failed"):
        checkpoint.save(tmp_path / "new.pt", _payload())
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_is_all_or_nothing(tmp_path):
    target = tmp_path / "out.bin"
    write_atomically(target, lambda f: f.write(b"first"))

    def broken(f):
        f.write(b"half")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(WriteError, match="could not write the samples .*input/output error"):
        write_atomically(target, broken, what="samples")
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
