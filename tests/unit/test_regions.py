"""Image preparation (drivers.camera.regions): the faster stand-ins for OpenCV calls give
what those calls give."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from drivers.camera import regions, synth


def _with_stats(mask: np.ndarray, min_area: int) -> list[tuple[int, int, int, int, int]]:
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    return [tuple(int(v) for v in stats[i]) for i in range(1, n) if stats[i][4] >= min_area]  # type: ignore[misc]


def test_components_of_nested_and_border_shapes() -> None:
    mask = np.zeros((300, 300), np.uint8)
    cv2.rectangle(mask, (10, 10), (200, 200), 255, -1)
    cv2.rectangle(mask, (30, 30), (180, 180), 0, -1)  # a hole...
    cv2.rectangle(mask, (60, 60), (120, 120), 255, -1)  # ...with a component inside it
    mask[0:20, 250:300] = 255  # touching two borders
    mask[290:, :] = 255
    mask[150, 250] = 255  # one pixel: below any area
    assert regions._components(mask, 0) == _with_stats(mask, 0)
    assert regions._components(mask, 1001) == _with_stats(mask, 1001)
    assert regions._components(np.zeros((50, 60), np.uint8), 0) == []


@pytest.mark.parametrize("seed", range(6))
def test_components_match_opencv_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    noise = (rng.random((180, 320)) < 0.08 + 0.05 * seed).astype(np.uint8) * 255
    mask = cv2.morphologyEx(noise, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    assert regions._components(mask, 0) == _with_stats(mask, 0)
    assert regions._components(mask, 150) == _with_stats(mask, 150)


def test_barcode_regions_of_a_generated_frame_hold_its_code() -> None:
    spec = synth.make_code("ean13", np.random.default_rng(4))
    frame = synth.compose(spec, size=(1280, 720), seed=4)
    boxes = regions.barcode_regions(frame)
    assert 1 <= len(boxes) <= 4
    assert all(0 <= x0 < x1 <= 1280 and 0 <= y0 < y1 <= 720 for x0, y0, x1, y1 in boxes)


@pytest.mark.parametrize("sigma", [1.5, 2.25, 3.0])
@pytest.mark.parametrize("preset", ["clean", "noise"])
def test_gaussian_is_opencvs_blur_within_two_levels(sigma: float, preset: str) -> None:
    spec = synth.make_code("upca", np.random.default_rng(2))
    img = synth.compose(spec, synth.PRESETS[preset], size=(640, 480), seed=2)[100:380, 100:540]
    ours = regions.gaussian(img, sigma)
    theirs = cv2.GaussianBlur(img, (0, 0), sigma)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert diff.max() <= 2 and diff.mean() < 0.25
