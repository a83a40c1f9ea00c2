"""A stop signal caught before the daemon's own handlers exist (see agent.cli.entry)."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class EarlyStop:
    """Remembers a stop signal that arrives before the daemon's own handlers are installed."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        self.event.set()

    def install(self) -> EarlyStop:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)
        return self

    def release(self) -> None:
        """Back to the defaults; a signal caught meanwhile is raised again."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.signum is not None:
            signal.raise_signal(self.signum)
