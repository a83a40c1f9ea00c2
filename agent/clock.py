"""The two clocks the core reads: monotonic for timers, wall for records and certificates.

Injected everywhere the rules or the core need the time, so tests drive them by hand
(``ManualClock``) and a wall-clock jump can be simulated without touching the system clock.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from agent.protocol import format_ts, ts_from_epoch


class Clock:
    """Monotonic seconds for timers, wall epoch seconds for what is recorded."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._monotonic = monotonic
        self._wall = wall

    def monotonic(self) -> float:
        return self._monotonic()

    def wall(self) -> float:
        return self._wall()

    def now_dt(self) -> dt.datetime:
        """The wall clock as an aware UTC datetime (certification checks, lookups)."""
        return dt.datetime.fromtimestamp(self.wall(), dt.timezone.utc)

    def now_ts(self) -> str:
        return format_ts(self.now_dt())

    @staticmethod
    def ts(epoch: float | None) -> str | None:
        return None if epoch is None else ts_from_epoch(epoch)


class ManualClock(Clock):
    """A clock that moves only when told to (tests, simulations)."""

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_790_000_000.0) -> None:
        self.mono_s = monotonic
        self.wall_s = wall
        super().__init__(lambda: self.mono_s, lambda: self.wall_s)

    def advance(self, seconds: float) -> None:
        """Both clocks move on together, as they do on a healthy machine."""
        self.mono_s += seconds
        self.wall_s += seconds

    def jump_wall(self, seconds: float) -> None:
        """Only the wall clock moves (an NTP step, an operator setting the date)."""
        self.wall_s += seconds
