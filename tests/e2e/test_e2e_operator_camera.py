"""A ``cabinetctl restock`` that timed out waiting for a scan must not swallow the next scan.

Issue 8 regression: the timed-out restock left its waiter with the core, and the next code held
up to the camera went to it (and so to nobody): an uncertified product shown in service mode
left no ``uncertified_scan`` record.

The camera is a glob of frames that all show an empty scene until the restock has timed out;
only then are the frames not yet played replaced by ones showing the code, so the code cannot
be seen before (a frame file is read when it is due).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from operator_support import FAST, ok

from agent.sim.cabinet import SimulatedCabinet
from drivers.camera import symbology as sym
from drivers.camera.synth import CodeSpec, Degradation, compose, empty_frame
from drivers.gs1 import with_check_digit

pytestmark = pytest.mark.timeout(60)
FRAMES = 300   # 30 s at 10 fps: more than the test takes


def _ean13(body12: str) -> CodeSpec:
    full = with_check_digit(body12)
    return CodeSpec("ean13", body12, sym.EAN13, full, full.zfill(14))


UNCERTIFIED = _ean13("697000000042")


def _frame_names(folder: Path) -> list[Path]:
    return [folder / f"f{i:04d}.png" for i in range(FRAMES)]


def _fill(folder: Path, image_path: Path) -> None:
    """Every frame file becomes a copy of ``image_path``, each swapped in whole (os.replace)."""
    for name in _frame_names(folder):
        tmp = name.with_suffix(".tmp")
        shutil.copyfile(image_path, tmp)
        os.replace(tmp, name)


@pytest.fixture
def camera_cabinet(tmp_path: Path) -> Iterator[tuple[SimulatedCabinet, Path]]:
    frames = tmp_path / "frames"
    frames.mkdir()
    empty = tmp_path / "empty.png"
    cv2.imwrite(str(empty), empty_frame((640, 480), seed=1))
    _fill(frames, empty)
    cab = SimulatedCabinet(tmp_path / "cab", cabinet_id="CAB-OPCAM", timings=FAST,
                           camera_source=str(frames / "f*.png"))
    try:
        cab.start(assign_lanes=False)
        yield cab, frames
    finally:
        cab.stop()


def test_a_timed_out_restock_does_not_swallow_the_next_scan(camera_cabinet: tuple[SimulatedCabinet, Path],
                                                             tmp_path: Path) -> None:
    cab, frames = camera_cabinet
    assert cab.platform is not None
    ok(cab.ctl("service", "on"))
    r = cab.ctl("restock", "B1", "--price", "100", "--wait", "0.5")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "no product code scanned" in r.stderr

    code = tmp_path / "code.png"
    cv2.imwrite(str(code), compose(UNCERTIFIED, Degradation(module_px=3), (640, 480), seed=3))
    _fill(frames, code)
    cab.platform.wait_for(lambda: any(e.get("gtin") == UNCERTIFIED.gtin for e in cab.platform.events(
        "uncertified_scan")), 15, "uncertified_scan of the code shown after the restock timed out")
    (event,) = [e for e in cab.platform.events("uncertified_scan") if e["gtin"] == UNCERTIFIED.gtin]
    assert event["context"] == "restock" and event["reason"] == "unknown" and event["code"] == UNCERTIFIED.text
    assert cab.platform.events("restock") == []
