"""The run's metrics: one JSON line per logged step in `metrics.jsonl` and, optionally, the same scalars as
TensorBoard events in `tensorboard/` (`torch.utils.tensorboard`, which needs the `tensorboard` package).

A run directory holds one run: opening the log at step s (a fresh run: s = 0; a resumed one: the checkpoint's
step) first drops every line after step s, so an interrupted and resumed run logs each step once; TensorBoard
events after s are purged the same way."""
from __future__ import annotations

import json
import math
from pathlib import Path

from flowkern.train.atomic import write_text_atomically

FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorboard() -> None:
    """ImportError with the install line when the optional `tensorboard` package is missing."""
    if not tensorboard_available():
        raise ImportError("TensorBoard logging needs the tensorboard package: python3 -m pip install tensorboard")


def read(path) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line, from a killed process, is left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate(path, step: int) -> None:
    """Keep only the records of metrics.jsonl up to and including `step` (all gone for step 0)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read(path) if isinstance(r.get("step"), int) and r["step"] <= step] if step > 0 else []
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept), what="metrics log")


class MetricsLog:
    """Appends records to out_dir/metrics.jsonl (and TensorBoard events) from step `step` on."""

    def __init__(self, out_dir, step: int = 0, *, tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        truncate(self.out_dir / FILE, step)
        self.file = open(self.out_dir / FILE, "a")
        self.writer = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=step + 1 if step else None)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
