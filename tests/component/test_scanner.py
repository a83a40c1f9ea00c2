"""CameraScanner end to end: glob and video sources through the real pipeline; the watchdog."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from drivers.camera import synth
from drivers.camera.capture import FrameSource, GlobSource, open_source
from drivers.camera.scanner import CameraScanner, Scan

SIZE = (640, 480)
DEADLINE_S = 20.0


def wait_for(cond: Callable[[], bool], timeout: float = DEADLINE_S) -> bool:
    """Poll ``cond`` until true or the deadline passes (no sleep-as-synchronisation)."""
    end = time.monotonic() + timeout
    ev = threading.Event()
    while time.monotonic() < end:
        if cond():
            return True
        ev.wait(0.01)
    return cond()


class Recorder:
    def __init__(self) -> None:
        self.scans: list[Scan] = []
        self.faults: list[str] = []
        self.recoveries = 0

    def on_scan(self, scan: Scan) -> None:
        self.scans.append(scan)

    def on_fault(self, detail: str) -> None:
        self.faults.append(detail)

    def on_recovered(self) -> None:
        self.recoveries += 1

    def scanner(self, source: str | FrameSource, fps: float = 25.0, **kw) -> CameraScanner:
        return CameraScanner(source, fps, self.on_scan, self.on_fault, self.on_recovered, **kw)


def code_frame(kind: str, seed: int) -> tuple[synth.CodeSpec, np.ndarray]:
    spec = synth.make_code(kind, np.random.default_rng(seed))
    return spec, synth.compose(spec, synth.PRESETS["clean"], size=SIZE, seed=seed)


def write_frames(folder: Path, frames: list[np.ndarray]) -> str:
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"frame_{i:04d}.png"), f)
    return str(folder / "frame_*.png")


@pytest.fixture
def scenario() -> tuple[list[np.ndarray], list[synth.CodeSpec]]:
    """A held code (6 frames, fresh noise on some), an empty gap, a QR, an UPC-E held twice."""
    a, fa = code_frame("ean13", 1)
    b, fb = code_frame("qr_dl", 2)
    c, fc = code_frame("upce", 3)
    empty = [synth.empty_frame(SIZE, seed=i, scene_seed=9) for i in range(3)]
    noisy_a = [np.clip(fa.astype(np.int16) + np.random.default_rng(i).integers(-6, 7, fa.shape), 0, 255)
               .astype(np.uint8) for i in range(3)]
    frames = [empty[0], fa, fa, fa, *noisy_a, empty[1], fb, fb, empty[2], fc, fc]
    return frames, [a, b, c]


def test_glob_source_scans_each_code_once(tmp_path: Path, scenario) -> None:
    frames, specs = scenario
    rec = Recorder()
    scanner = rec.scanner(write_frames(tmp_path, frames))
    scanner.start()
    try:
        assert wait_for(lambda: scanner.idle), "glob never played to its end"
    finally:
        scanner.stop()
    assert scanner.frames == len(frames)
    assert [(s.symbology, s.text, s.gtin) for s in rec.scans] == [(x.symbology, x.text, x.gtin) for x in specs]
    assert all(s.gtin is not None for s in rec.scans)
    assert [s.at_monotonic for s in rec.scans] == sorted(s.at_monotonic for s in rec.scans)
    assert rec.faults == [] and rec.recoveries == 0
    assert scanner.decoded_frames < scanner.frames  # unchanged frames were not decoded again


def test_code_back_after_the_window_is_scanned_again(tmp_path: Path) -> None:
    a, fa = code_frame("ean8", 4)
    gap = [synth.empty_frame(SIZE, seed=i, scene_seed=2) for i in range(40)]  # 1.6 s at 25 fps
    rec = Recorder()
    scanner = rec.scanner(write_frames(tmp_path, [fa, fa, *gap, fa]), debounce_s=0.3)
    scanner.start()
    try:
        assert wait_for(lambda: scanner.idle)
    finally:
        scanner.stop()
    assert [s.text for s in rec.scans] == [a.text, a.text]
    assert rec.scans[1].at_monotonic - rec.scans[0].at_monotonic >= 0.3


def test_empty_glob_idles_without_fault(tmp_path: Path) -> None:
    rec = Recorder()
    scanner = rec.scanner(str(tmp_path / "nothing_*.png"), stall_s=0.2)
    scanner.start()
    try:
        assert wait_for(lambda: scanner.idle)
        assert scanner.running  # idling, not dead
    finally:
        scanner.stop()
    assert rec.faults == [] and rec.scans == [] and scanner.frames == 0


def test_video_file_plays_then_idles_without_fault(tmp_path: Path) -> None:
    spec, frame = code_frame("qr_gs1", 6)
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, SIZE, isColor=False)
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/AVI")
    for _ in range(6):
        writer.write(frame)
    writer.release()
    rec = Recorder()
    scanner = rec.scanner(path, stall_s=0.2)
    scanner.start()
    try:
        assert wait_for(lambda: scanner.idle)
    finally:
        scanner.stop()
    assert scanner.frames == 6
    assert [(s.symbology, s.text, s.gtin) for s in rec.scans] == [(spec.symbology, spec.text, spec.gtin)]
    assert rec.faults == []


def test_callback_exceptions_do_not_kill_the_thread(tmp_path: Path, scenario) -> None:
    frames, specs = scenario
    seen: list[str] = []

    def explode(scan: Scan) -> None:
        seen.append(scan.text)
        raise RuntimeError("consumer bug")

    scanner = CameraScanner(write_frames(tmp_path, frames), 25.0, explode, lambda d: None, lambda: None)
    scanner.start()
    try:
        assert wait_for(lambda: scanner.idle)
        assert scanner.running
    finally:
        scanner.stop()
    assert seen == [s.text for s in specs]


class FlakyCamera(FrameSource):
    """A live camera whose frames stop and resume on command (no real device in CI)."""

    live = True
    description = "flaky test camera"

    def __init__(self, frame: np.ndarray) -> None:
        super().__init__()
        self.frame = frame
        self.alive = threading.Event()
        self.alive.set()
        self.dead_reads = 0

    def read(self) -> np.ndarray | None:
        if self.alive.is_set():
            return self.frame
        self.dead_reads += 1
        return None


def test_stalled_live_camera_faults_once_and_recovers() -> None:
    spec, frame = code_frame("ean13", 7)
    cam = FlakyCamera(frame)
    rec = Recorder()
    scanner = rec.scanner(cam, fps=50.0, stall_s=0.3, max_backoff_s=0.2)
    scanner.start()
    try:
        assert wait_for(lambda: len(rec.scans) == 1)
        cam.alive.clear()
        assert wait_for(lambda: rec.faults != [])
        stalled_frames = scanner.frames
        reads_at_fault = cam.dead_reads
        assert wait_for(lambda: cam.dead_reads >= reads_at_fault + 3)  # several more stalled rounds
        assert rec.faults == ["no frames from flaky test camera"]  # once, not per retry
        assert scanner.faulted and rec.recoveries == 0
        cam.alive.set()
        assert wait_for(lambda: rec.recoveries == 1)
        assert wait_for(lambda: scanner.frames > stalled_frames)
        assert not scanner.faulted
    finally:
        scanner.stop()
    assert len(rec.faults) == 1


def test_unopenable_device_faults_once_and_keeps_retrying() -> None:
    rec = Recorder()
    scanner = rec.scanner("/dev/video-cabinet-test-missing", stall_s=0.2, max_backoff_s=0.1)
    scanner.start()
    try:
        assert wait_for(lambda: rec.faults != [])
        assert rec.faults == ["no frames from /dev/video-cabinet-test-missing"]
        attempts = scanner.open_attempts
        assert wait_for(lambda: scanner.open_attempts >= attempts + 3)  # it keeps reopening
        assert scanner.running and len(rec.faults) == 1
    finally:
        t = time.monotonic()
        scanner.stop()
        assert time.monotonic() - t < 2.0
    assert not scanner.running


def test_stop_is_prompt_on_a_long_glob(tmp_path: Path) -> None:
    _, fa = code_frame("ean13", 8)
    rec = Recorder()
    scanner = rec.scanner(write_frames(tmp_path, [fa] * 3), fps=0.5)  # would play for 6 s
    scanner.start()
    assert wait_for(lambda: scanner.frames >= 1)
    t = time.monotonic()
    scanner.stop()
    assert time.monotonic() - t < 1.0 and not scanner.running


def test_glob_source_paces_at_fps_and_never_skips(tmp_path: Path) -> None:
    write_frames(tmp_path, [synth.empty_frame(SIZE, seed=i) for i in range(4)])
    now = [100.0]
    src = open_source(str(tmp_path / "frame_*.png"), 2.0, clock=lambda: now[0])
    assert isinstance(src, GlobSource) and not src.live
    assert src.read() is not None  # frame 0 is due at once
    assert src.read() is None  # frame 1 due at +0.5 s
    now[0] += 2.0  # a late reader gets frames 1, 2, 3 in a row
    assert [src.read() is not None for _ in range(3)] == [True, True, True]
    assert src.ended and src.read() is None


def test_open_source_classifies() -> None:
    from drivers.camera.capture import SourceError, is_live

    assert is_live("0") and is_live("/dev/video0") and not is_live("/tmp/x.mp4")
    with pytest.raises(SourceError):
        open_source("/nonexistent/clip.mp4", 10.0)
