"""Pure judgement of whether a lane's weight has settled (spec/serial.md, "stable").

Spec rule: a weight is stable when, over the last ``settle_s``, the motion bit was clear
in every reading and max - min of the readings is at most 2 divisions.

Precise definition used here, for ``is_stable(now)`` with window start ``w = now - settle_s``:

- The **judged readings** are every reading with ``w <= t <= now`` plus the *anchor*: the
  latest reading at or before ``w``. The anchor is what the scale showed when the window
  opened (a reading holds until the next one), so including it means the quiet readings
  really cover the whole window rather than starting somewhere inside it. Without an
  anchor (history shorter than ``settle_s``) the window is not stable.
- Every judged reading must have the motion bit clear, and max - min of their weights
  must be at most 2 divisions (the largest ``division_g`` among them, with a tiny
  tolerance for float rounding, since e.g. ``13.4 - 13.2`` is ``0.2000000000000011``).
- Optionally (``max_gap_s``), no gap between consecutive judged readings, nor between the
  newest one and ``now``, may exceed ``max_gap_s``: a transmitter that stopped answering
  is not "quiet". Without it the caller is expected to :meth:`reset` after read failures.

Consequence: after the last moving reading, the first quiet reading at ``t_q`` makes the
window stable at ``now >= t_q + settle_s`` (if the weights agree).

:attr:`StabilityWindow.value` is the **latest** reading, not the window mean: it is what an
operator sees on the transmitter's display, it is a real measured value on the division
grid, and once the window is stable every reading is within 2 divisions of it anyway.

No clock, threads or I/O: the caller passes times, so tests use explicit fake times.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

# Relative slack, in divisions, for comparing float weight spreads against 2 divisions.
_SPREAD_TOLERANCE_DIVISIONS = 1e-6
MAX_SPREAD_DIVISIONS = 2


@dataclass(frozen=True)
class _Sample:
    t: float
    grams: float
    motion: bool
    division_g: float


class StabilityWindow:
    """Readings of one transmitter over the last ``settle_s`` seconds, plus one anchor before.

    Memory is bounded: on every :meth:`add`, readings that can no longer be the anchor or
    lie in any window ending at or after the newest reading are dropped.
    """

    def __init__(self, settle_s: float, max_gap_s: float | None = None) -> None:
        if settle_s <= 0:
            raise ValueError(f"settle_s must be > 0, got {settle_s}")
        if max_gap_s is not None and max_gap_s <= 0:
            raise ValueError(f"max_gap_s must be > 0, got {max_gap_s}")
        self.settle_s = settle_s
        self.max_gap_s = max_gap_s
        self._samples: deque[_Sample] = deque()

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, t: float, grams: float, motion: bool, division_g: float) -> None:
        """Record a reading taken at time ``t`` (seconds, any monotonic origin).

        Times must not go backwards; a reading older than the newest one is a caller bug
        (ValueError), because it would make the anchor and the window ambiguous.
        """
        if division_g <= 0:
            raise ValueError(f"division_g must be > 0, got {division_g}")
        if self._samples and t < self._samples[-1].t:
            raise ValueError(f"reading at t={t} is older than the newest one at t={self._samples[-1].t}")
        self._samples.append(_Sample(t, grams, motion, division_g))
        # Any later is_stable(now >= t) has its window start at or after t - settle_s, so
        # only the last reading at or before that point can still serve as the anchor.
        horizon = t - self.settle_s
        while len(self._samples) >= 2 and self._samples[1].t <= horizon:
            self._samples.popleft()

    def reset(self) -> None:
        """Forget every reading (after a read failure, a session start, a re-zero...)."""
        self._samples.clear()

    @property
    def value(self) -> float | None:
        """Weight of the latest reading in grams (None when empty); see module docstring for why."""
        return self._samples[-1].grams if self._samples else None

    def _judged(self, now: float) -> list[_Sample] | None:
        """Anchor plus readings in ``[now - settle_s, now]``, or None when history is too short."""
        start = now - self.settle_s
        anchor: _Sample | None = None
        inside: list[_Sample] = []
        for s in self._samples:
            if s.t > now:
                break  # a reading "from the future" of this query is not part of its window
            if s.t <= start:
                anchor = s
            else:
                inside.append(s)
        if anchor is None:
            return None
        return [anchor, *inside]

    def is_stable(self, now: float) -> bool:
        """True when the readings covering ``[now - settle_s, now]`` are quiet and agree.

        ``now`` is expected to be at or after the newest reading (the caller's clock moves
        forward); pruning in :meth:`add` only keeps what such queries need.
        """
        judged = self._judged(now)
        if judged is None:
            return False
        if any(s.motion for s in judged):
            return False
        if self.max_gap_s is not None:
            times = [s.t for s in judged] + [now]
            if any(b - a > self.max_gap_s for a, b in itertools.pairwise(times)):
                return False
        weights = [s.grams for s in judged]
        division = max(s.division_g for s in judged)
        spread_divisions = (max(weights) - min(weights)) / division
        return spread_divisions <= MAX_SPREAD_DIVISIONS + _SPREAD_TOLERANCE_DIVISIONS
