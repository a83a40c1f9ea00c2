"""Debounce of scans: "the same code seen again within 2 s is one scan" (spec/serial.md).

The window slides: every sighting of a code restarts its window, so a code held in front of
the camera for 10 s (seen on every frame, or re-confirmed by the scanner while the scene is
unchanged) is one scan, and it counts again only after it has been out of sight for at least
``window_s``. Pure: the caller passes the time, so tests use a fake clock.
"""

from __future__ import annotations


class Debouncer:
    """Remembers when each code key was last seen."""

    def __init__(self, window_s: float = 2.0) -> None:
        if window_s < 0:
            raise ValueError("window_s must be >= 0")
        self.window_s = window_s
        self._last: dict[str, float] = {}
        self._next_prune = float("-inf")

    def seen(self, key: str, now: float) -> bool:
        """Record a sighting of ``key`` at ``now``; True if it is a new scan."""
        last = self._last.get(key)
        self._last[key] = now
        self._prune(now)
        return last is None or now - last >= self.window_s

    def _prune(self, now: float) -> None:
        """Forget codes out of sight for longer than the window (bounded memory)."""
        if now < self._next_prune:
            return
        self._next_prune = now + max(self.window_s, 1.0)
        stale = [k for k, t in self._last.items() if now - t >= self.window_s]
        for k in stale:
            del self._last[k]
