"""Atomic file writes: the new content goes to a temporary file beside the target, is flushed to disk, and then
renamed over it, so a reader sees the old file or the new one, never a part of one. A failed write (a full disk, a
read-only directory) removes the temporary file, leaves the target as it was and raises `WriteError` naming the
file and the reason."""
from __future__ import annotations

import errno
import os
from pathlib import Path


class WriteError(OSError):
    """A file that could not be written; the previous version of it (if any) is untouched."""


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left" in str(err):
        return "no space left on device"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def write_atomically(path, write, *, what: str = "file") -> Path:
    """Call ``write(file)`` on a binary file object of a temporary file, then rename it to `path`.

    `what` names the content in the error ("checkpoint", "samples"). WriteError if anything fails; the temporary
    file is removed and an existing `path` is kept."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:          # a Ctrl-C mid-write too: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        if not isinstance(err, (OSError, RuntimeError)):
            raise
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise WriteError(f"could not write the {what} {str(path)!r}: {_reason(err)}{kept}") from err
    return path


def write_text_atomically(path, text: str, *, what: str = "file") -> Path:
    return write_atomically(path, lambda f: f.write(text.encode()), what=what)
