"""The daemon's side of the camera: supervises the camera process, debounces, reports.

``CameraScanner(source, fps, on_scan=..., on_fault=..., on_recovered=...)`` starts
``python -m drivers.camera.child`` (capture, decode scheduling, the barcode pipeline) and a
supervisor thread that reads its messages (``loop`` lists them): frames never enter the
daemon, only the codes in view and health. The supervisor

* debounces what is in view into ``Scan`` callbacks ("the same code seen again within 2 s
  is one scan", the window sliding while it stays in view) -- here, so that a restarted
  camera process does not report a code still in view a second time;
* treats the process dying (a native crash of zbar or zxing-cpp: SIGSEGV, abort) or going
  silent for ``hang_s`` (a hang: it is killed) as a ``camera_fault``, restarts it with a
  doubling delay (``restart_backoff_s`` .. ``max_backoff_s``; back to the start once a
  process has run ``stable_s``), and calls ``on_recovered`` when frames flow again; a file
  or glob resumes after the frame being decoded when it crashed, so a poisonous frame is
  not met twice;
* forwards the process's own camera faults (a live camera without frames) the same way:
  one ``on_fault`` per episode, one ``on_recovered`` at its end;
* calls ``on_degraded(detail)`` once when a decoder library is missing (the camera runs with
  the other one), ``on_degraded_cleared()`` if a later process has both again.

A ``FrameSource`` object (a test's fake camera), or an explicit ``pipeline``, runs the same
loop in a thread of this process instead (``isolate=False``): objects cannot cross.
Callback exceptions are logged, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.camera.capture import FrameSource
from drivers.camera.debounce import Debouncer
from drivers.camera.decoder import BarcodePipeline
from drivers.camera.loop import CameraLoop, Message
from drivers.camera.schedule import DecodeScheduler

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding ``drivers``


@dataclass(frozen=True)
class Scan:
    """A debounced sighting of a code."""

    symbology: str
    text: str
    gtin: str | None
    at_monotonic: float


def _site_dirs() -> set[str]:
    """Where installed packages live (the child finds an installed ``drivers`` there itself)."""
    import site

    dirs = set(getattr(site, "getsitepackages", lambda: [])())
    dirs.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    return {str(Path(d).resolve()) for d in dirs if d}


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class CameraScanner:
    """Turns a camera into debounced ``Scan`` callbacks (see the module doc)."""

    def __init__(self, source: str | FrameSource, fps: float, on_scan: Callable[[Scan], None],
                 on_fault: Callable[[str], None], on_recovered: Callable[[], None],
                 pipeline: BarcodePipeline | None = None, clock: Callable[[], float] = time.monotonic,
                 stall_s: float = 5.0, debounce_s: float = 2.0, skip_unchanged: bool = True,
                 max_backoff_s: float = 10.0, *, on_degraded: Callable[[str], None] | None = None,
                 on_degraded_cleared: Callable[[], None] | None = None, isolate: bool | None = None,
                 hang_s: float = 10.0, restart_backoff_s: float = 0.5, stable_s: float = 30.0,
                 log_level: str | None = None) -> None:
        if fps <= 0:
            raise ValueError("fps must be > 0")
        self.source = source
        self.fps = fps
        self._on_scan = on_scan
        self._on_fault = on_fault
        self._on_recovered = on_recovered
        self._on_degraded = on_degraded
        self._on_degraded_cleared = on_degraded_cleared
        self.pipeline = pipeline
        self._clock = clock
        self.stall_s = stall_s
        self.skip_unchanged = skip_unchanged
        self.max_backoff_s = max_backoff_s
        self.hang_s = hang_s
        self.restart_backoff_s = restart_backoff_s
        self.stable_s = stable_s
        self.log_level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
        if isolate is None:
            isolate = not isinstance(source, FrameSource) and pipeline is None
        if isolate and isinstance(source, FrameSource):
            raise ValueError("a FrameSource object cannot be handed to a camera process")
        self.isolated = isolate
        self._debouncer = Debouncer(debounce_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._t0: float | None = None
        self._position = 0  # next frame of a file/glob (where a new process resumes)
        self._base = {"frames": 0, "decoded": 0, "opens": 0}  # counters of processes gone
        self._live = {"frames": 0, "decoded": 0, "opens": 0}  # counters of the running one
        self._degraded: str | None = None
        self.missing_decoders: list[str] = []  # "zbar", "zxing": decoders the camera runs without
        self.faulted = False
        self.idle = False  # a file/glob source played to its end
        self.restarts = 0
        self.last_frame_at: float | None = None
        self.last_message_at: float | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("scanner already started")
        self._t0 = time.monotonic()  # a glob plays from now, whenever its process is ready
        target = self._supervise if self.isolated else self._run_here
        self._thread = threading.Thread(target=target, name="camera-scanner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the camera (process and thread) and wait for it."""
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            self._end(proc, grace=min(2.0, timeout))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("camera thread did not stop within %.1f s", timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def child_pid(self) -> int | None:
        """The camera process's pid while one runs (tests kill it)."""
        with self._lock:
            proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def frames(self) -> int:
        return self._base["frames"] + self._live["frames"]

    @property
    def decoded_frames(self) -> int:
        return self._base["decoded"] + self._live["decoded"]

    @property
    def open_attempts(self) -> int:
        return self._base["opens"] + self._live["opens"]

    # ------------------------------------------------------------------ in this process

    def _run_here(self) -> None:
        loop = CameraLoop(self.source, self.fps, self._message, self._stop, pipeline=self.pipeline,
                          scheduler=DecodeScheduler(enabled=self.skip_unchanged), clock=self._clock,
                          stall_s=self.stall_s, max_backoff_s=self.max_backoff_s, t0=self._t0)
        try:
            loop.run()
        except Exception:  # the thread must report, not vanish silently
            log.exception("camera thread crashed")
            self._fault(f"camera thread crashed on {self.source}")

    # ------------------------------------------------------------------ the camera process

    def _config(self, fd: int) -> str:
        return json.dumps({"source": self.source, "fps": self.fps, "msg_fd": fd, "stall_s": self.stall_s,
                           "max_backoff_s": self.max_backoff_s, "start": self._position, "t0": self._t0,
                           "skip_unchanged": self.skip_unchanged, "log_level": self.log_level})

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        r, w = os.pipe()
        env = dict(os.environ)
        if _PACKAGE_ROOT not in _site_dirs():  # a source checkout: make ``drivers`` importable there
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "drivers.camera.child", self._config(w)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(w,), env=env,
                                    close_fds=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        log.info("camera process started (pid %d) for %s", proc.pid, self.source)
        return proc, r

    def _end(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        """Close its stdin (it stops between frames), then SIGTERM, then SIGKILL."""
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    break
            try:
                proc.wait(grace if sig is not signal.SIGKILL else 5.0)
                return
            except subprocess.TimeoutExpired:
                continue

    def _supervise(self) -> None:
        backoff = self.restart_backoff_s
        while not self._stop.is_set():
            try:
                proc, fd = self._spawn()
            except OSError as exc:
                self._fault(f"cannot start the camera process: {exc}")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            with self._lock:
                self._proc = proc
            started = time.monotonic()
            try:
                why = self._pump(proc, fd)
            finally:
                os.close(fd)
            if why == "hang":
                log.error("camera process %d silent for %.0f s: killing it", proc.pid, self.hang_s)
                proc.kill()
            self._end(proc, grace=1.0)
            with self._lock:
                self._proc = None
            self._retire_counters()
            if self._stop.is_set():
                break
            detail = (f"camera process hung (no message for {self.hang_s:g} s), killed" if why == "hang"
                      else f"camera process {_describe_exit(proc.returncode)}")
            log.error("%s; restarting it in %.1f s", detail, backoff)
            self._fault(detail)
            self.restarts += 1
            if time.monotonic() - started >= self.stable_s:
                backoff = self.restart_backoff_s
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def _pump(self, proc: subprocess.Popen[bytes], fd: int) -> str:
        """Read the process's messages until it ends ("eof"), hangs ("hang") or we stop ("stop")."""
        buf = b""
        last = time.monotonic()
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                if time.monotonic() - last > self.hang_s:
                    return "hang"
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return "eof"
            last = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("camera process sent a bad message: %r", line[:200])
                    continue
                self._message(msg)
        return "stop"

    def _retire_counters(self) -> None:
        for k in self._base:
            self._base[k] += self._live[k]
            self._live[k] = 0

    # ------------------------------------------------------------------ messages (both modes)

    def _message(self, msg: Message) -> None:
        kind = msg.get("t")
        self.last_message_at = time.monotonic()
        if kind == "seen":
            now = float(msg.get("at", self._clock()))
            self.last_frame_at = now
            for symbology, text, gtin in msg.get("codes", []):
                if self._debouncer.seen(f"{symbology}\x00{text}", now):
                    self._call(self._on_scan, Scan(symbology, text, gtin, now))
        elif kind == "beat":
            self._counters(msg)
        elif kind == "decoding":
            self._position = int(msg.get("i", self._position))
        elif kind in ("up", "recovered"):
            self._recover()
        elif kind == "fault":
            self._fault(str(msg.get("detail", "camera fault")))
        elif kind == "idle":
            self._counters(msg)
            self.idle = True
        elif kind == "hello":
            self._hello(msg)

    def _counters(self, msg: Message) -> None:
        for k in ("frames", "decoded", "opens"):
            if k in msg:
                self._live[k] = int(msg[k])
        if "i" in msg:
            self._position = int(msg["i"])

    def _hello(self, msg: Message) -> None:
        self.missing_decoders = [str(n) for n in msg.get("missing", [])]
        degraded = msg.get("degraded")
        if degraded and degraded != self._degraded:
            log.warning("camera decoders degraded: %s", degraded)
            self._degraded = str(degraded)
            if self._on_degraded is not None:
                self._call(self._on_degraded, self._degraded)
        elif not degraded and self._degraded is not None:
            self._degraded = None
            if self._on_degraded_cleared is not None:
                self._call(self._on_degraded_cleared)

    def _fault(self, detail: str) -> None:
        if self.faulted:
            return
        self.faulted = True
        log.warning("camera fault: %s", detail)
        self._call(self._on_fault, detail)

    def _recover(self) -> None:
        if not self.faulted:
            return
        self.faulted = False
        log.info("camera recovered: frames flow again")
        self._call(self._on_recovered)

    @staticmethod
    def _call(fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("camera callback %s failed", getattr(fn, "__name__", fn))
