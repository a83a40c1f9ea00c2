"""Frame sources (spec/serial.md "Camera"): anything OpenCV's VideoCapture opens, or a glob.

``open_source(source, fps)`` picks by the text of ``source``:

* ``"0"``, ``"2"`` -- a V4L2 index; ``/dev/video*`` (or any ``/dev/`` path) -- a device.
  Both are *live*: a live source that stops giving frames is a fault for the scanner.
* a glob (contains ``*``, ``?`` or ``[``) -- image files played once, in name order, at
  ``fps``, starting when the source is opened. An empty glob is valid and simply ends.
* ``synth:idle`` / ``synth:moving`` (optionally ``?size=WxH``) -- a generated live camera
  (``scenes``): an empty noisy shelf, or a shopper moving with a product in hand. For the
  benchmark and the tests; a simulator, like the lock board's.
* anything else -- a video file or an OpenCV image-sequence pattern (``img_%03d.png``).

A file or glob that has played to its end sets ``ended`` and then only returns None: the
camera idles, which is not a fault. Every frame is returned as 2-D uint8 grayscale. File
and glob sources can start at a frame (``start``) and report ``position``, the index of
the next frame: a restarted camera process resumes after the frame it was decoding.
"""

from __future__ import annotations

import glob as globmod
import logging
import time
from collections.abc import Callable

import cv2
import numpy as np

from drivers.camera.source import FrameSource, SourceError, to_gray

log = logging.getLogger(__name__)

__all__ = ["FrameSource", "GlobSource", "SourceError", "VideoCaptureSource", "is_live", "open_source", "to_gray"]


class VideoCaptureSource(FrameSource):
    """cv2.VideoCapture: a V4L2 index/device (live) or a video file / image sequence."""

    def __init__(self, target: int | str, fps: float, live: bool, start: int = 0) -> None:
        super().__init__()
        self.live = live
        self.description = str(target)
        self._cap = cv2.VideoCapture(target)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"cannot open camera source {target!r}")
        if start > 0 and not live:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, float(start))
            self.position = start
        if live:
            # Newest frame, not a stale buffer; a bounded read so a dead camera cannot
            # block the scanner thread (and stop()) for OpenCV's default 10 s.
            self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            self._cap.set(cv2.CAP_PROP_FPS, float(fps))
            timeout = getattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC", None)
            if timeout is not None:
                self._cap.set(timeout, 1000.0)

    def read(self) -> np.ndarray | None:
        if self.ended:
            return None
        ok, frame = self._cap.read()
        if not ok or frame is None:
            if not self.live:
                log.info("camera source %s played to its end", self.description)
                self.ended = True
            return None
        self.position += 1
        return to_gray(frame)

    def close(self) -> None:
        self._cap.release()


class GlobSource(FrameSource):
    """Image files matching a glob, each returned once, in name order, paced at ``fps``.

    Frame i becomes due ``i / fps`` seconds after the source was opened (or ``t0``); ``read()``
    returns the next due frame, or None when it is not due yet. A late reader gets every frame
    (consecutively), never a skipped one, so a test's frames are all seen; ``frame_time`` is
    when the frame was due, the time the camera pipeline judges it at (debounce, schedule).
    """

    def __init__(self, pattern: str, fps: float, clock: Callable[[], float] = time.monotonic,
                 start: int = 0, t0: float | None = None) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError("fps must be > 0")
        self.description = pattern
        self.files = sorted(globmod.glob(pattern))
        self._period = 1.0 / fps
        self._clock = clock
        self._t0 = clock() if t0 is None else t0  # frame i is due at t0 + i / fps
        self._next = max(0, start)
        self.position = self._next
        if not self.files:
            log.info("camera glob %s matches no file: nothing to play", pattern)
            self.ended = True
        elif self._next >= len(self.files):
            self.ended = True

    def read(self) -> np.ndarray | None:
        while not self.ended:
            if self._clock() < self._t0 + self._next * self._period:
                return None
            path = self.files[self._next]
            self.frame_time = self._t0 + self._next * self._period
            self._next += 1
            self.position = self._next
            if self._next >= len(self.files):
                self.ended = True
                log.info("camera glob %s played to its end (%d files)", self.description, len(self.files))
            frame = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
            if frame is not None:
                return frame
            log.warning("camera glob: cannot read image %s, skipped", path)
        return None


def is_live(source: str) -> bool:
    """True for a V4L2 index, a device path or a generated camera: sources whose silence is a fault."""
    source = source.strip()
    return source.isdigit() or source.startswith(("/dev/", "synth:"))


def open_source(source: str, fps: float, clock: Callable[[], float] = time.monotonic, start: int = 0,
                t0: float | None = None) -> FrameSource:
    """Open ``source`` (see the module doc); raises SourceError if it cannot be opened.

    ``start``/``t0``: resume a file or glob at frame ``start`` on the schedule begun at ``t0``.
    """
    source = source.strip()
    if source.startswith("synth:"):
        from drivers.camera.scenes import open_scene

        return open_scene(source)
    if any(ch in source for ch in "*?["):
        return GlobSource(source, fps, clock, start=start, t0=t0)
    if source.isdigit():
        return VideoCaptureSource(int(source), fps, live=True)
    return VideoCaptureSource(source, fps, live=source.startswith("/dev/"), start=start)
