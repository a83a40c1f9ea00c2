"""Which camera frames to decode: cheap when idle, bounded while the scene moves.

A shopper in view changes every frame, and a cluttered 720p frame can cost 40 ms to decode:
decoding them all is 40 % of a core on a small ARM board. Nothing needs that: a code is one
scan for as long as it stays in view, and the debounce window (2 s) is long against a few
decodes a second. So a frame is decoded when

* the scene came to rest and shows something not decoded yet (a product held up), or
  within ``settle_frames`` frames after that (motion blur fading),
* the scene keeps moving, at most every ``moving_interval_s``,
* nothing changed for ``refresh_s`` (a safety net),

and never while the decode budget is spent: while the scene moves, decoding may take at most
``duty`` of the time (a decode that took ``d`` seconds is followed by ``d * (1 / duty - 1)``
without one); a scene at rest may use up to ``rest_duty`` (it is a product held up now,
and resting scenes are rare: each costs at most 1 + ``settle_frames`` decodes).
The budget binds live cameras (a file or glob played for a test or the demo has every
scene judged). The times are the frames' times: wall time for a camera, the due time of
each frame for a glob played late (its frames then pass as if on time).
Frames arriving meanwhile are skipped, not queued. "Changed" is judged on an area-averaged
thumbnail (160 px wide at 720p), which averages sensor noise away. Pure apart from the remembered
thumbnails: the caller passes the time, so tests use a fake clock.
"""

from __future__ import annotations

import cv2
import numpy as np

CHANGE_LEVEL = 12  # grey levels a thumbnail pixel must move to count as changed
CHANGE_FRACTION = 0.002  # share of thumbnail pixels that must change


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """An area-averaged thumbnail, an eighth of the width, of every few rows.

    Each thumbnail pixel averages at least 16 pixels (8 columns x 2 sampled rows at 720p,
    more on smaller frames): sensor noise sigma 8 -> 2, so the difference of two frames
    (sigma ~2.8) stays far below CHANGE_LEVEL. Only every 4th row of a 720p frame is read:
    a cold 720p frame costs ~2 ms just to touch on a small CPU (every 8th row, 8 pixels
    averaged, was measured to trip the gate on every noisy frame).
    """
    h, w = gray.shape[:2]
    step = max(1, h // 180)
    tw = max(8, w // 8)
    th = max(1, round(h * tw / w))
    return cv2.resize(gray[::step], (tw, th), interpolation=cv2.INTER_AREA)


def differs(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return True
    return bool(np.count_nonzero(cv2.absdiff(a, b) > CHANGE_LEVEL) > CHANGE_FRACTION * a.size)


class DecodeScheduler:
    """Decides, frame by frame, whether to decode (see the module doc)."""

    def __init__(self, settle_frames: int = 2, refresh_s: float = 5.0, moving_interval_s: float = 0.25,
                 duty: float = 0.1, rest_duty: float = 0.5, enabled: bool = True) -> None:
        if not (0.0 < duty <= 1.0 and 0.0 < rest_duty <= 1.0):
            raise ValueError("duty and rest_duty must be in (0, 1]")
        self.settle_frames = settle_frames
        self.refresh_s = refresh_s
        self.moving_interval_s = moving_interval_s
        self.duty = duty
        self.rest_duty = rest_duty
        self.enabled = enabled  # False: decode every frame (the benchmark's reference)
        self._prev: np.ndarray | None = None  # thumbnail of the previous frame
        self._decoded: np.ndarray | None = None  # thumbnail of the last decoded frame
        self._still = 0  # frames since the scene last moved
        self.stale = False  # the last frame offered shows something not decoded
        self._last_start = float("-inf")
        self._last_cost = 0.0
        self.skipped_busy = 0  # frames not decoded because the budget was spent

    def offer(self, gray: np.ndarray, now: float, budget: bool = True) -> bool:
        """True if this frame should be decoded now (then call ``done`` after decoding).

        ``budget=False``: no duty cycle (a file or glob played for a test or a demo, whose
        every frame is to be judged; the budget protects a live camera's CPU)."""
        if not self.enabled:
            return True
        thumb = thumbnail(gray)
        moving = differs(thumb, self._prev)
        self._prev = thumb
        self._still = 0 if moving else self._still + 1
        new = differs(thumb, self._decoded)
        self.stale = new
        if moving:
            want = now - self._last_start >= self.moving_interval_s
        else:
            want = new or self._still <= self.settle_frames or now - self._last_start >= self.refresh_s
        if not want:
            return False
        duty = self.duty if moving else self.rest_duty
        if budget and now < self._last_start + self._last_cost / duty:
            self.skipped_busy += 1
            return False
        self._decoded = thumb
        self._last_start = now
        self._last_cost = 0.0
        self.stale = False
        return True

    def done(self, cost_s: float) -> None:
        """Record the cost of the decode ``offer`` allowed last: the next one waits until
        the duty cycle allows it (``cost_s / duty`` after that one started)."""
        self._last_cost = max(0.0, cost_s)
