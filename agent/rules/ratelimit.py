"""Bounded refusals (mqtt.md v1.1): a flood of garbage costs bounded disk, memory and bandwidth.

Refusals are recorded singly up to ``limit`` in any ``window_s``; beyond that they are only
counted, and the count is reported as one ``rejections_suppressed`` event at most once per
window. Pure: the caller passes the time in.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from agent.protocol import REJECTIONS_PER_MINUTE


class SlidingWindow:
    """At most ``limit`` admissions in any ``window_s`` seconds."""

    def __init__(self, limit: int = REJECTIONS_PER_MINUTE, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> bool:
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


@dataclass(frozen=True)
class Suppressed:
    """What a ``rejections_suppressed`` event reports."""

    what: str
    count: int
    since_wall: float


class RejectionLimiter:
    """Which refusals of one kind (``what``: command or catalog) are recorded singly."""

    def __init__(self, what: str, limit: int = REJECTIONS_PER_MINUTE, window_s: float = 60.0) -> None:
        self.what = what
        self.window = SlidingWindow(limit, window_s)
        self.window_s = window_s
        self._count = 0
        self._since_wall = 0.0
        self._last_report = -1e18

    def admit(self, now: float, wall: float) -> bool:
        """True: record this refusal singly; False: it is counted for the next report."""
        if self.window.admit(now):
            return True
        if self._count == 0:
            self._since_wall = wall
        self._count += 1
        return False

    def due(self, now: float) -> Suppressed | None:
        """The report to record now, at most one per window, or None."""
        if self._count == 0 or now - self._last_report < self.window_s:
            return None
        report = Suppressed(self.what, self._count, self._since_wall)
        self._count = 0
        self._last_report = now
        return report
