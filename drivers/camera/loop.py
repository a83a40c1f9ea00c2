"""The camera loop: one frame source, one pipeline; frames in, small messages out.

It runs in the camera's child process (``child``), or in a thread for a ``FrameSource``
object a test injects. Frames never leave it: what it reports are plain dicts (the same
ones ``child`` writes as JSON lines), so the daemon's side sees only scans and health:

* ``hello``    -- decoders loaded, and why one is missing (``degraded``)
* ``up``       -- the source gives frames (or has played to its end): the camera works
* ``seen``     -- the codes in view on a frame (decoded now, or the last decode while the
  scene is unchanged, so a code held still stays "in view" for the debouncer)
* ``decoding`` -- about to decode frame ``i - 1`` of a file or glob (a crash resumes at ``i``)
* ``beat``     -- at least every ``beat_s``: counters; silence means the process hangs
* ``fault`` / ``recovered`` -- a live camera that gives no frame for ``stall_s`` (or cannot
  be opened for that long), reported once, reopened with a doubling delay (capped); a file
  or glob that cannot be opened at all is reported once, as a misconfigured camera
* ``idle``     -- a file or glob played to its end (not a fault)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from drivers.camera.backends import DecoderUnavailable
from drivers.camera.capture import FrameSource, SourceError, is_live, open_source
from drivers.camera.decoder import BarcodePipeline, Decoded
from drivers.camera.schedule import DecodeScheduler

log = logging.getLogger(__name__)

Message = dict[str, Any]
Emit = Callable[[Message], None]


class CameraLoop:
    """Reads ``source`` at ``fps`` until ``stop`` is set, reporting through ``emit``."""

    def __init__(self, source: str | FrameSource, fps: float, emit: Emit, stop: threading.Event,
                 pipeline: BarcodePipeline | None = None, scheduler: DecodeScheduler | None = None,
                 clock: Callable[[], float] = time.monotonic, stall_s: float = 5.0, max_backoff_s: float = 10.0,
                 start: int = 0, t0: float | None = None, beat_s: float = 1.0) -> None:
        if fps <= 0:
            raise ValueError("fps must be > 0")
        self.source = source
        self.fps = fps
        self._emit = emit
        self._stop = stop
        self._clock = clock
        self.stall_s = stall_s
        self.max_backoff_s = max_backoff_s
        self._start = start
        self._t0 = t0
        self.beat_s = beat_s
        self.scheduler = scheduler or DecodeScheduler()
        self.pipeline = pipeline
        self._pipeline_error: str | None = None
        self.frames = 0
        self.decoded = 0
        self.opens = 0
        self._position = start
        self._cached: list[Decoded] = []
        self._last: tuple[np.ndarray, float] | None = None  # a frame not decoded yet
        self._faulted = False
        self._up = False
        self._next_beat = 0.0
        if isinstance(source, FrameSource):
            self._desc, self._live = source.description, source.live
        else:
            self._desc, self._live = source, is_live(source)

    # ------------------------------------------------------------------ reporting

    def _send(self, kind: str, **fields: Any) -> None:
        self._emit({"t": kind, **fields})

    def _beat(self, now: float, force: bool = False) -> None:
        if force or now >= self._next_beat:
            self._next_beat = now + self.beat_s
            self._send("beat", frames=self.frames, decoded=self.decoded, i=self._position, opens=self.opens)

    def _fault(self, detail: str) -> None:
        if not self._faulted:
            self._faulted = True
            log.warning("camera fault: %s", detail)
            self._send("fault", detail=detail)

    def _mark_up(self) -> None:
        if self._faulted:
            self._faulted = False
            log.info("camera %s delivers frames again", self._desc)
            self._send("recovered")
        if not self._up:
            self._up = True
            self._send("up")

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """The whole life of the loop; returns when ``stop`` is set."""
        if self.pipeline is None:
            try:
                self.pipeline = BarcodePipeline()
            except DecoderUnavailable as exc:  # neither decoder loads: capture on, decode nothing
                self._pipeline_error = f"no barcode decoder: {exc.reason}"
                log.error("%s", self._pipeline_error)
        if self.pipeline is not None:  # first use loads and allocates: not on a shopper's frame
            self.pipeline.decode(np.zeros((32, 32), np.uint8))
        degraded = self._pipeline_error or (self.pipeline.degraded if self.pipeline else None)
        names = self.pipeline.backends.names if self.pipeline else []
        missing = [n for n in ("zxing", "zbar") if n not in names]
        self._send("hello", decoders=names, missing=missing, degraded=degraded)
        try:
            self._loop()
        finally:
            self._beat(self._clock(), force=True)

    def _open(self) -> FrameSource | None:
        self.opens += 1
        if isinstance(self.source, FrameSource):
            return self.source
        try:
            return open_source(self.source, self.fps, self._clock, start=self._position, t0=self._t0)
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
                self._beat(self._clock(), force=True)
                if src is None:
                    if not self._live:
                        self._fault(f"cannot open camera source {self._desc}")
                        self._idle(playable=False)
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
                self._mark_up()
                self._handle(frame, now, src)
            elif src.ended:
                self._position = src.position
                self._flush(src)
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
            self._beat(self._clock())
            next_tick = max(next_tick + period, self._clock() - period)
            self._stop.wait(max(0.0, next_tick - self._clock()))
        if src is not None and not isinstance(self.source, FrameSource):
            src.close()

    def _idle(self, playable: bool = True) -> None:
        """Played to its end (the camera is fine: ``up``), or never opened (still faulted)."""
        log.info("camera source %s idle", self._desc)
        if playable:
            self._mark_up()
        self._send("idle", frames=self.frames, decoded=self.decoded, i=self._position)
        while not self._stop.wait(self.beat_s):
            self._beat(self._clock(), force=True)

    def _handle(self, frame: np.ndarray, now: float, src: FrameSource) -> None:
        """One frame: decode it if the scheduler says so, report what is in view. A glob's
        frame is judged at its due time (a late reader's frames keep their spacing)."""
        self.frames += 1
        self._position = src.position
        at = src.frame_time if src.frame_time is not None else now
        if self.pipeline is not None and self.scheduler.offer(frame, at, budget=src.live):
            self._decode(frame, src)
        self._last = None if not self.scheduler.stale else (frame, at)
        if self._cached and not self.scheduler.stale:
            # the scene is the one decoded: what it showed is still in view
            self._send("seen", at=at, codes=[[d.symbology, d.text, d.gtin] for d in self._cached])

    def _decode(self, frame: np.ndarray, src: FrameSource) -> None:
        if not src.live:
            self._send("decoding", i=self._position)
        started = time.perf_counter()
        try:
            assert self.pipeline is not None
            self._cached = self.pipeline.decode(frame)
        except Exception:  # a Python-level failure on one frame; native crashes kill the process
            log.exception("barcode pipeline failed on a frame")
            self._cached = []
        self.scheduler.done(time.perf_counter() - started)
        self.decoded += 1

    def _flush(self, src: FrameSource) -> None:
        """A file or glob ended on a frame not decoded yet: decode it before idling."""
        if self._last is None or self.pipeline is None:
            return
        frame, at = self._last
        self._last = None
        self._decode(frame, src)
        if self._cached:
            self._send("seen", at=at, codes=[[d.symbology, d.text, d.gtin] for d in self._cached])
