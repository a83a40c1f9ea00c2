"""The camera thread: owns one frame source, decodes, debounces, reports scans and faults.

Cheap when idle: a frame is decoded only when it differs from the last decoded one (a
160-px-wide area-averaged thumbnail, which averages sensor noise away), for a few frames
after a change (a code coming to rest after motion blur), and once every ``refresh_s``
as a safety net; an unchanged frame re-reports the last decoded codes to the debouncer,
so a code held still stays "in view" and is one scan. scripts/bench_decode.py measures it.

Watchdog: a live camera that gives no frame for ``stall_s`` (or cannot be opened for that
long) is reported once through ``on_fault``; the thread reopens it with a doubling delay
(capped) and calls ``on_recovered`` when frames come again. A file or glob that played to
its end idles; it is never a fault (a file that cannot be opened at all is reported once,
as a misconfigured camera, and then idles). Callback exceptions are logged, never fatal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from drivers.camera.capture import FrameSource, SourceError, is_live, open_source
from drivers.camera.debounce import Debouncer
from drivers.camera.decoder import BarcodePipeline, Decoded

log = logging.getLogger(__name__)

THUMB_WIDTH = 160
CHANGE_LEVEL = 12  # grey levels a thumbnail pixel must move to count as changed
CHANGE_FRACTION = 0.002  # share of thumbnail pixels that must change


@dataclass(frozen=True)
class Scan:
    """A debounced sighting of a code."""

    symbology: str
    text: str
    gtin: str | None
    at_monotonic: float


class ChangeGate:
    """Decides whether a frame is worth decoding (pure apart from its remembered thumbnail)."""

    def __init__(self, settle_frames: int = 3, refresh_s: float = 5.0) -> None:
        self.settle_frames = settle_frames
        self.refresh_s = refresh_s
        self._ref: np.ndarray | None = None
        self._since_change = 0
        self._last_decode = float("-inf")

    def should_decode(self, gray: np.ndarray, now: float) -> bool:
        h, w = gray.shape[:2]
        th = max(1, round(h * THUMB_WIDTH / w))
        # Every 4th row only: a cold 720p frame costs ~2 ms just to touch on a small CPU.
        # 16 pixels are still averaged per thumbnail pixel: sensor noise sigma 8 -> 2, so
        # the difference of two frames (sigma ~2.8) stays far below CHANGE_LEVEL. Every 8th
        # row (8 pixels averaged) was measured to trip the gate on every noisy frame.
        thumb = cv2.resize(gray[::4], (THUMB_WIDTH, th), interpolation=cv2.INTER_AREA)
        changed = self._ref is None or self._ref.shape != thumb.shape or (
            np.count_nonzero(cv2.absdiff(thumb, self._ref) > CHANGE_LEVEL) > CHANGE_FRACTION * thumb.size)
        self._since_change = 0 if changed else self._since_change + 1
        if changed or self._since_change <= self.settle_frames or now - self._last_decode >= self.refresh_s:
            self._ref = thumb
            self._last_decode = now
            return True
        return False


class CameraScanner:
    """A thread that turns camera frames into debounced ``Scan`` callbacks."""

    def __init__(self, source: str | FrameSource, fps: float, on_scan: Callable[[Scan], None],
                 on_fault: Callable[[str], None], on_recovered: Callable[[], None],
                 pipeline: BarcodePipeline | None = None, clock: Callable[[], float] = time.monotonic,
                 stall_s: float = 5.0, debounce_s: float = 2.0, skip_unchanged: bool = True,
                 max_backoff_s: float = 10.0) -> None:
        if fps <= 0:
            raise ValueError("fps must be > 0")
        self.source = source
        self.fps = fps
        self._on_scan = on_scan
        self._on_fault = on_fault
        self._on_recovered = on_recovered
        self.pipeline = pipeline or BarcodePipeline()
        self._clock = clock
        self.stall_s = stall_s
        self.max_backoff_s = max_backoff_s
        self._debouncer = Debouncer(debounce_s)
        self._gate = ChangeGate() if skip_unchanged else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cached: list[Decoded] = []
        self.frames = 0  # frames read
        self.open_attempts = 0  # opening the source (1 + reopens after stalls)
        self.decoded_frames = 0  # frames that went through the pipeline
        self.last_frame_at: float | None = None
        self.faulted = False
        self.idle = False  # a file/glob source played to its end
        if isinstance(source, FrameSource):
            self._desc, self._live = source.description, source.live
        else:
            self._desc, self._live = source, is_live(source)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("scanner already started")
        self._thread = threading.Thread(target=self._run, name="camera-scanner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it (a live read is bounded to ~1 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("camera thread did not stop within %.1f s", timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # the thread must report, not vanish silently
            log.exception("camera thread crashed")
            self._fault(f"camera thread crashed on {self._desc}")

    def _open(self) -> FrameSource | None:
        self.open_attempts += 1
        if isinstance(self.source, FrameSource):
            return self.source
        try:
            return open_source(self.source, self.fps, self._clock)
        except SourceError as exc:
            log.warning("%s", exc)
            return None

    def _loop(self) -> None:
        period = 1.0 / self.fps
        backoff = initial_backoff = 0.5
        progress_at = self._clock()  # last frame, or when we started waiting for one
        src: FrameSource | None = None
        next_tick = self._clock()
        while not self._stop.is_set():
            if src is None:
                src = self._open()
                if src is None:
                    if not self._live:
                        self._fault(f"cannot open camera source {self._desc}")
                        self._idle()
                        return
                    if self._clock() - progress_at >= self.stall_s:
                        self._fault(f"no frames from {self._desc}")
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
            frame = src.read()
            now = self._clock()
            if frame is not None:
                progress_at = now
                backoff = initial_backoff
                if self.faulted:
                    self.faulted = False
                    log.info("camera %s delivers frames again", self._desc)
                    self._call(self._on_recovered)
                self._handle(frame, now)
            elif src.ended:
                src.close()
                self._idle()
                return
            elif self._live and now - progress_at >= self.stall_s:
                self._fault(f"no frames from {self._desc}")
                if not isinstance(self.source, FrameSource):
                    src.close()
                    src = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            next_tick = max(next_tick + period, self._clock() - period)
            self._stop.wait(max(0.0, next_tick - self._clock()))
        if src is not None and not isinstance(self.source, FrameSource):
            src.close()

    def _idle(self) -> None:
        self.idle = True
        log.info("camera source %s idle", self._desc)
        self._stop.wait()

    def _fault(self, detail: str) -> None:
        if self.faulted:
            return
        self.faulted = True
        log.warning("camera fault: %s", detail)
        self._call(self._on_fault, detail)

    def _handle(self, frame: np.ndarray, now: float) -> None:
        self.frames += 1
        self.last_frame_at = now
        if self._gate is None or self._gate.should_decode(frame, now):
            try:
                self._cached = self.pipeline.decode(frame)
            except Exception:
                log.exception("barcode pipeline failed on a frame")
                self._cached = []
            self.decoded_frames += 1
        for d in self._cached:
            if self._debouncer.seen(f"{d.symbology}\x00{d.text}", now):
                self._call(self._on_scan, Scan(d.symbology, d.text, d.gtin, now))

    @staticmethod
    def _call(fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("camera callback %s failed", getattr(fn, "__name__", fn))
