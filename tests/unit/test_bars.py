"""The pixel check (drivers.camera.bars) against symbols drawn by real encoders
(python-barcode, zxing-cpp's writer): patterns, fits, the module-centre reading."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from drivers.camera import bars, synth
from drivers.camera import symbology as sym
from drivers.gs1 import classify, with_check_digit


def rendered(kind: str, seed: int = 3) -> tuple[synth.CodeSpec, np.ndarray]:
    spec = synth.make_code(kind, np.random.default_rng(seed))
    return spec, synth.render_symbol(spec)


def extent(img: np.ndarray) -> tuple[int, int]:
    row = img[img.shape[0] // 3]
    dark = np.where(row < 128)[0]
    return int(dark[0]), int(dark[-1]) + 1


@pytest.mark.parametrize("kind", ["ean13", "upca", "ean8", "upce"])
def test_pattern_is_the_encoders_bars(kind: str) -> None:
    spec, img = rendered(kind)
    bits = bars.pattern(spec.symbology, spec.text)
    assert bits is not None
    x0, x1 = extent(img)
    width = (x1 - x0) / len(bits)
    row = img[img.shape[0] // 3]
    sampled = (row[(x0 + (np.arange(len(bits)) + 0.5) * width).astype(int)] < 128).astype(np.uint8)
    assert sampled.tolist() == bits.tolist()


def test_pattern_only_for_ean_upc() -> None:
    assert bars.pattern(sym.CODE128, "LOT-1") is None
    assert bars.pattern(sym.EAN13, "59012341234") is None  # 11 digits
    assert len(bars.pattern(sym.UPCA, "036000291452")) == 95  # type: ignore[arg-type]


def small_and_blurred(img: np.ndarray, px: float = 1.6, blur: float = 0.9) -> np.ndarray:
    """The symbol as a cheap camera sees it: 1.6 px per module, defocused, noisy."""
    f = px / synth.RENDER_MODULE_PX
    out = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA).astype(np.float32)
    out = cv2.GaussianBlur(out, (0, 0), blur) + np.random.default_rng(1).normal(0, 4, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["ean13", "upca", "ean8", "upce"])
def test_the_module_centres_read_the_true_text(kind: str) -> None:
    spec, img = rendered(kind)
    small = small_and_blurred(img)
    f = 1.6 / synth.RENDER_MODULE_PX
    x0, x1 = (v * f for v in extent(img))
    h = small.shape[0]
    reading = bars.read_pixels(small, spec.symbology, spec.text, x0, x1, 0.1 * h, 0.6 * h)
    assert reading is not None
    assert reading.text == spec.text and reading.quiet and reading.fit > 0.8


def test_a_wrong_valid_text_fits_worse_and_is_read_as_the_true_one() -> None:
    spec, img = rendered("ean13")
    wrong = with_check_digit(spec.text[:5] + ("7" if spec.text[5] != "7" else "2") + spec.text[6:12])
    assert classify(wrong, sym.EAN13)[0] is not None and wrong != spec.text
    small = small_and_blurred(img)
    f = 1.6 / synth.RENDER_MODULE_PX
    x0, x1 = (v * f for v in extent(img))
    h = small.shape[0]
    true_fit = bars.fit(small, bars.pattern(sym.EAN13, spec.text), x0, x1, 0.1 * h, 0.6 * h)  # type: ignore[arg-type]
    wrong_fit = bars.fit(small, bars.pattern(sym.EAN13, wrong), x0, x1, 0.1 * h, 0.6 * h)  # type: ignore[arg-type]
    assert true_fit > wrong_fit + 0.02
    reading = bars.read_pixels(small, sym.EAN13, wrong, x0, x1, 0.1 * h, 0.6 * h)
    assert reading is not None and reading.text == spec.text


def test_a_piece_of_a_longer_symbol_has_no_quiet_zone() -> None:
    """The UPC-E pattern "found" inside an EAN-13: bars continue beyond its guards."""
    spec, img = rendered("ean13")
    small = small_and_blurred(img, blur=0.6)
    f = 1.6 / synth.RENDER_MODULE_PX
    x0, x1 = (v * f for v in extent(img))
    h = small.shape[0]
    width = (x1 - x0) / 95
    # pretend a decoder reported a UPC-E over the symbol's first 51 modules
    reading = bars.read_pixels(small, sym.UPCE, "01234565", x0, x0 + 51 * width, 0.1 * h, 0.6 * h)
    assert reading is not None and not reading.quiet


def test_upright_crop_turns_a_rotated_symbol_level() -> None:
    spec, img = rendered("ean13")
    h, w = img.shape
    frame = cv2.copyMakeBorder(img, 200, 200, 200, 200, cv2.BORDER_CONSTANT, value=255)
    m = cv2.getRotationMatrix2D((frame.shape[1] / 2, frame.shape[0] / 2), 20, 1.0)
    turned = cv2.warpAffine(frame, m, (frame.shape[1], frame.shape[0]), borderValue=255)
    x0, x1 = extent(img)
    quad = np.asarray([[x0 + 200, 300], [x1 + 200, 300], [x1 + 200, 340], [x0 + 200, 340]], dtype=np.float32)
    quad = np.asarray(cv2.transform(quad.reshape(-1, 1, 2), m)).reshape(-1, 2)
    got = bars.upright_crop(turned, [quad])
    assert got is not None
    crop, fm = got
    angle = bars.bar_angle(crop, (0, 0, crop.shape[1], crop.shape[0]))
    assert angle is not None and abs(angle) < 2.0
    ends = cv2.transform(quad[:2].reshape(-1, 1, 2), fm).reshape(-1, 2)
    reading = bars.read_pixels(crop, sym.EAN13, spec.text, float(ends[:, 0].min()), float(ends[:, 0].max()),
                               0.2 * crop.shape[0], 0.8 * crop.shape[0])
    assert reading is not None and reading.text == spec.text
    assert w > 0 and h > 0
