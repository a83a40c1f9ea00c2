"""The camera's child process (issue 10): a native crash or a hang is a camera fault, the
process is restarted, frames flow again and that is reported; frames never cross, scans
do; a missing decoder library degrades the camera instead of stopping it. Real processes,
real decoders, a generated live camera (``synth:``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from camera_support import hiding
from drivers.camera import synth
from drivers.camera.scanner import CameraScanner, Scan

pytestmark = pytest.mark.timeout(120)
MOVING = "synth:moving?size=640x480&seed=4"
EXPECTED = synth.make_code("ean13", np.random.default_rng(4))  # what the moving scene shows
DEADLINE = 30.0


class Events:
    """Everything the scanner calls back, in order, with a condition to wait on."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []
        self._cond = threading.Condition()

    def _add(self, kind: str, value: object = None) -> None:
        with self._cond:
            self.items.append((kind, value))
            self._cond.notify_all()

    def on_scan(self, scan: Scan) -> None:
        self._add("scan", scan)

    def on_fault(self, detail: str) -> None:
        self._add("fault", detail)

    def on_recovered(self) -> None:
        self._add("recovered")

    def on_degraded(self, detail: str) -> None:
        self._add("degraded", detail)

    def kinds(self) -> list[str]:
        with self._cond:
            return [k for k, _ in self.items]

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        """Until ``pred``: woken by every callback, and every 50 ms for scanner state
        nobody notifies about (counters, idle)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {self.items}")
                self._cond.wait(min(0.05, left))

    def count(self, kind: str) -> int:
        return self.kinds().count(kind)

    def scanner(self, source: str, **kw: object) -> CameraScanner:
        return CameraScanner(source, 10.0, self.on_scan, self.on_fault, self.on_recovered,
                             on_degraded=self.on_degraded, **kw)  # type: ignore[arg-type]


def scans(ev: Events) -> list[tuple[str, str, str | None]]:
    return [(s.symbology, s.text, s.gtin) for k, s in ev.items if k == "scan"]  # type: ignore[attr-defined]


def test_a_segfault_in_the_camera_process_is_a_fault_and_it_recovers() -> None:
    ev = Events()
    cam = ev.scanner(MOVING, debounce_s=0.5)
    cam.start()
    try:
        ev.wait(lambda: ev.count("scan") >= 1, "a first scan")
        pid = cam.child_pid
        assert pid is not None and pid != os.getpid()
        os.kill(pid, signal.SIGSEGV)
        ev.wait(lambda: ev.count("recovered") >= 1, "recovery after the crash")
        assert ev.kinds()[ev.kinds().index("fault"):].count("fault") == 1
        fault = next(v for k, v in ev.items if k == "fault")
        assert "SIGSEGV" in str(fault)
        assert cam.child_pid not in (None, pid) and cam.restarts == 1
        n = ev.count("scan")
        ev.wait(lambda: ev.count("scan") > n, "a scan from the new process")  # debounce 0.5 s: it comes back
        assert set(scans(ev)) == {(EXPECTED.symbology, EXPECTED.text, EXPECTED.gtin)}
        assert not cam.faulted
    finally:
        cam.stop()
    assert not cam.running and cam.child_pid is None


def test_a_hung_camera_process_is_killed_and_replaced() -> None:
    ev = Events()
    cam = ev.scanner(MOVING, hang_s=2.0)
    cam.start()
    try:
        ev.wait(lambda: ev.count("scan") >= 1, "a first scan")
        pid = cam.child_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # as if stuck in native code: no message any more
        ev.wait(lambda: ev.count("fault") >= 1, "the hang reported")
        assert "hung" in str(next(v for k, v in ev.items if k == "fault"))
        ev.wait(lambda: ev.count("recovered") >= 1, "recovery")
        assert cam.child_pid not in (None, pid)
        with pytest.raises(ProcessLookupError):  # the stopped one was killed, not left behind
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                threading.Event().wait(0.05)
    finally:
        cam.stop()


def test_a_crash_on_a_glob_resumes_after_the_frame_being_decoded(tmp_path: Path) -> None:
    """The frame that crashed the decoder is not met again (no crash loop), the rest is played."""
    a = synth.make_code("ean8", np.random.default_rng(1))
    b = synth.make_code("qr_dl", np.random.default_rng(2))
    frames = ([synth.compose(a, size=(640, 480), seed=1)] * 5 + [synth.empty_frame((640, 480), seed=3)] * 30
              + [synth.compose(b, size=(640, 480), seed=2)] * 5)
    for i, f in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"f{i:03d}.png"), f)
    ev = Events()
    cam = ev.scanner(str(tmp_path / "f*.png"))
    cam.start()
    try:
        ev.wait(lambda: ev.count("scan") >= 1, "the first code")
        os.kill(cam.child_pid or 0, signal.SIGSEGV)
        ev.wait(lambda: cam.idle, "the glob played to its end")
        ev.wait(lambda: ev.count("recovered") >= 1, "recovery")
    finally:
        cam.stop()
    assert [t for _, t, _ in scans(ev)] == [a.text, b.text]  # each once: resumed, not replayed


def test_without_zbar_the_camera_reads_with_zxing_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", hiding(tmp_path / "shim", "zbar"))
    ev = Events()
    cam = ev.scanner(MOVING)
    cam.start()
    try:
        ev.wait(lambda: ev.count("scan") >= 1, "a scan by zxing-cpp alone")
    finally:
        cam.stop()
    degraded = [str(v) for k, v in ev.items if k == "degraded"]
    assert len(degraded) == 1 and degraded[0].startswith("zbar unavailable: ImportError")
    assert cam.missing_decoders == ["zbar"]
    assert scans(ev) == [(EXPECTED.symbology, EXPECTED.text, EXPECTED.gtin)]
    assert ev.count("fault") == 0


def test_without_any_decoder_the_camera_runs_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", hiding(tmp_path / "shim", "zbar", "zxing"))
    ev = Events()
    cam = ev.scanner(MOVING)
    cam.start()
    try:
        ev.wait(lambda: ev.count("degraded") >= 1, "the degraded report")
        ev.wait(lambda: cam.frames >= 10, "frames flowing")
        assert cam.running and cam.restarts == 0
    finally:
        cam.stop()
    detail = str(next(v for k, v in ev.items if k == "degraded"))
    assert detail.startswith("no barcode decoder") and "zbar unavailable" in detail and "zxing unavailable" in detail
    assert ev.count("scan") == 0 and ev.count("fault") == 0
