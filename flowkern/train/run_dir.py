"""The run directory (`--out`): checked before anything is written, and held by one run at a time.

`check_out_dir` refuses a path that is an existing file or lies under a directory this process cannot write.
`RunLock` takes an exclusive `fcntl.flock` on ``<out>/.lock`` for the whole run (the kernel releases it when the
process ends, however it ends): a second `flowkern train` on the same directory is refused while the first runs."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK = ".lock"


class RunDirError(ValueError):
    """A run directory that cannot be used (a file, not writable, or in use by another run)."""


def check_out_dir(out) -> Path:
    """`out` as a Path; RunDirError if it is not a directory, or it (or its nearest existing parent) is not
    writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} is an existing file, not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {str(out)!r}: cannot write in {str(probe)!r} (read-only or no permission)")
    return out


class RunLock:
    """Context manager holding ``<out>/.lock`` (RunDirError if another process holds it)."""

    def __init__(self, out):
        self.path = Path(out) / LOCK
        self.file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise RunDirError(f"--out {str(self.path.parent)!r} is in use by another run ({holder}); wait for it "
                              f"or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
