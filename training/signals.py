"""SIGINT and SIGTERM turned into a request to stop at the end of the current step."""

from __future__ import annotations

import signal
import threading
from typing import Self

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Inside the block, SIGINT or SIGTERM sets `received` (the signal's number) instead of ending
    the process, so that a training loop saves its state and stops; a second signal acts as it
    would outside (Ctrl-C twice quits at once). Only the main thread can take signals: elsewhere
    the block changes nothing."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        return self

    def handle(self, signum: int, frame) -> None:
        self.received = signum
        self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
