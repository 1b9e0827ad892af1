"""SIGINT / SIGTERM during training: the first one is recorded (the loop finishes its step, saves and stops); a
second SIGINT interrupts at once (KeyboardInterrupt)."""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The signal received while training (`signum`, None until one arrives)."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


@contextlib.contextmanager
def stop_requests():
    """A `StopRequest` whose handlers replace SIGINT's and SIGTERM's inside the block (the main thread only;
    elsewhere signals keep their handlers and the request stays empty)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
