"""The barcode pipeline on generated frames: every symbology x every degradation, minimum
decode rates asserted, zero misreads; plus the symbology names. (The arbitration rules are
tested in tests/unit/test_arbiter.py, real photos in test_realphotos.py.)"""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest

from drivers.camera import decoder as decoder_module
from drivers.camera import symbology as sym
from drivers.camera import synth
from drivers.camera.decoder import QUICK, BarcodePipeline, Decoded

SIZE = (1280, 720)
# Measured 175/180 at this seed; the floors leave room for library updates, not for regressions.
MIN_RATE_BY_DEGRADATION = {"clean": 1.0, "mixed": 0.6}
MIN_RATE_DEFAULT = 0.85
MIN_RATE_BY_KIND = 0.85
MIN_RATE_OVERALL = 0.92


@pytest.fixture(scope="module")
def samples() -> list[synth.Sample]:
    return synth.sample_set(per_case=2, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def decoded(samples: list[synth.Sample]) -> list[list[Decoded]]:
    pipe = BarcodePipeline()
    return [pipe.decode(s.image) for s in samples]


def _hit(s: synth.Sample, got: list[Decoded]) -> bool:
    return Decoded(s.spec.symbology, s.spec.text, s.spec.gtin) in got


def test_every_degradation_meets_its_minimum_rate(samples, decoded) -> None:
    hits, totals = Counter(), Counter()
    for s, got in zip(samples, decoded, strict=True):
        totals[s.degradation] += 1
        hits[s.degradation] += _hit(s, got)
    assert set(totals) == set(synth.PRESETS)
    for deg, total in totals.items():
        floor = MIN_RATE_BY_DEGRADATION.get(deg, MIN_RATE_DEFAULT)
        assert hits[deg] / total >= floor, f"{deg}: {hits[deg]}/{total} read"


def test_every_symbology_meets_its_minimum_rate(samples, decoded) -> None:
    hits, totals = Counter(), Counter()
    for s, got in zip(samples, decoded, strict=True):
        totals[s.spec.kind] += 1
        hits[s.spec.kind] += _hit(s, got)
    assert set(totals) == set(synth.KINDS)
    for kind, total in totals.items():
        assert hits[kind] / total >= MIN_RATE_BY_KIND, f"{kind}: {hits[kind]}/{total} read"
    assert sum(hits.values()) / sum(totals.values()) >= MIN_RATE_OVERALL


def test_no_misreads_on_code_frames(samples, decoded) -> None:
    wrong = [(s.name, d) for s, got in zip(samples, decoded, strict=True) for d in got
             if d != Decoded(s.spec.symbology, s.spec.text, s.spec.gtin)]
    assert wrong == []


def test_nothing_read_from_empty_noisy_frames() -> None:
    pipe = BarcodePipeline()
    for seed in range(6):
        assert pipe.decode(synth.empty_frame(SIZE, seed=seed, noise_sigma=10.0)) == []


def test_combined_reads_more_than_either_decoder_alone(samples, decoded) -> None:
    """The reason for the combined default: zbar and zxing-cpp fail on different frames."""
    subset = [(s, got) for s, got in zip(samples, decoded, strict=True)
              if s.degradation in ("blur", "low_contrast", "rotation")]
    combined = sum(_hit(s, got) for s, got in subset)
    alone = {b: sum(_hit(s, BarcodePipeline(b).decode(s.image)) for s, _ in subset) for b in ("pyzbar", "zxing")}
    assert combined > max(alone.values()), (combined, alone)


@pytest.mark.parametrize("backend", ["combined", "zxing", "pyzbar"])
def test_each_backend_names_clean_symbols_the_same_way(backend: str) -> None:
    """UPC-A as 'UPC-A' with 12 digits and UPC-E with 8 digits, whatever the library says."""
    pipe = BarcodePipeline(backend)
    for kind in synth.KINDS:
        spec = synth.make_code(kind, np.random.default_rng(11))
        img = synth.compose(spec, synth.PRESETS["clean"], size=(640, 480), seed=11)
        assert pipe.decode(img) == [Decoded(spec.symbology, spec.text, spec.gtin)], kind


def test_bgr_input_is_accepted() -> None:
    spec = synth.make_code("ean13", np.random.default_rng(5))
    gray = synth.compose(spec, size=(640, 480), seed=5)
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    assert BarcodePipeline().decode(bgr) == [Decoded(spec.symbology, spec.text, spec.gtin)]


def test_two_codes_in_one_frame_both_reported_once() -> None:
    a = synth.make_code("ean13", np.random.default_rng(1))
    b = synth.make_code("qr_dl", np.random.default_rng(2))
    left = synth.compose(a, size=(640, 480), seed=1)
    right = synth.compose(b, size=(640, 480), seed=2)
    frame = np.hstack([left, right, left])  # a twice, b once
    got = BarcodePipeline().decode(frame)
    assert sorted(got, key=lambda d: d.text) == sorted(
        [Decoded(a.symbology, a.text, a.gtin), Decoded(b.symbology, b.text, b.gtin)], key=lambda d: d.text)


def test_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError):
        BarcodePipeline("tesseract")
    with pytest.raises(ValueError):
        BarcodePipeline(find_order="sideways")


class _Counting:
    """Wraps the pipeline's zxing-cpp backend: records the options of every whole-frame read."""

    def __init__(self, pipe: BarcodePipeline, shape: tuple[int, ...]) -> None:
        assert pipe._zx is not None
        self._read = pipe._zx.read
        self.shape = shape
        self.full_frame: list[str] = []
        pipe._zx.read = self  # type: ignore[method-assign]

    def __call__(self, img: np.ndarray, **kw: bool) -> list:
        if img.shape == self.shape:
            self.full_frame.append("quick" if kw == QUICK else "full" if not kw else repr(kw))
        return self._read(img, **kw)


def _frame(kind: str, seed: int, size: tuple[int, int] = (640, 480)) -> tuple[synth.CodeSpec, np.ndarray]:
    spec = synth.make_code(kind, np.random.default_rng(seed))
    return spec, synth.compose(spec, size=size, seed=seed)


def test_an_upright_code_needs_only_the_quick_pass() -> None:
    spec, frame = _frame("ean13", 11)
    pipe = BarcodePipeline()
    calls = _Counting(pipe, frame.shape)
    regions = []
    pipe._regions = lambda g: regions.append(1) or []  # type: ignore[method-assign]
    assert pipe.decode(frame) == [Decoded(spec.symbology, spec.text, spec.gtin)]
    assert calls.full_frame == ["quick"] and not regions


def test_a_code_turned_90_degrees_is_read_in_its_region() -> None:
    spec, frame = _frame("ean13", 12)
    turned = np.ascontiguousarray(np.rot90(frame))  # bars horizontal: no upright scan line crosses them
    pipe = BarcodePipeline()
    calls = _Counting(pipe, turned.shape)
    assert pipe.decode(turned) == [Decoded(spec.symbology, spec.text, spec.gtin)]
    assert calls.full_frame == ["quick"]  # the region, straightened, read it: no full search


def test_the_region_search_stops_at_the_first_region_that_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, frame = _frame("ean13", 12)
    turned = np.ascontiguousarray(np.rot90(frame))
    real = decoder_module.barcode_regions
    decoy = (0, 0, 40, 40)   # a corner of the frame, after the code's own region: never looked at
    monkeypatch.setattr(decoder_module, "barcode_regions", lambda gray, n: [*real(gray, n), decoy])
    crops: list[tuple[int, ...]] = []
    real_deskew = decoder_module.deskew

    def spy(crop: np.ndarray, *a: float) -> tuple[np.ndarray, np.ndarray] | None:
        crops.append(crop.shape)   # every region the search looks at is straightened first
        return real_deskew(crop, *a)

    monkeypatch.setattr(decoder_module, "deskew", spy)
    pipe = BarcodePipeline()
    assert pipe.decode(turned) == [Decoded(spec.symbology, spec.text, spec.gtin)]
    assert crops and (40, 40) not in crops


def test_a_light_on_dark_code_is_found_by_the_full_search() -> None:
    spec, frame = _frame("qr_text", 13)
    inverted = np.ascontiguousarray(255 - frame)
    pipe = BarcodePipeline()
    calls = _Counting(pipe, inverted.shape)
    assert pipe.decode(inverted) == [Decoded(spec.symbology, spec.text, spec.gtin)]
    assert calls.full_frame == ["quick", "full"]  # neither the upright pass nor a region read it


def test_full_first_order_and_the_libraries_alone_use_the_full_search() -> None:
    spec, frame = _frame("ean13", 11)
    for pipe in (BarcodePipeline(find_order="full"), BarcodePipeline("zxing")):
        calls = _Counting(pipe, frame.shape)
        assert Decoded(spec.symbology, spec.text, spec.gtin) in pipe.decode(frame)
        assert calls.full_frame == ["full"]


# ------------------------------------------------------------------ symbology names


@pytest.mark.parametrize(("name", "ours"), [
    ("EAN13", sym.EAN13), ("EAN8", sym.EAN8), ("UPCA", sym.UPCA), ("UPCE", sym.UPCE),
    ("CODE128", sym.CODE128), ("QRCODE", sym.QR), ("CODE39", None), ("I25", None)])
def test_from_pyzbar(name: str, ours: str | None) -> None:
    assert sym.from_pyzbar(name) == ours


def test_from_zxing_formats() -> None:
    import zxingcpp

    f = zxingcpp.BarcodeFormat
    assert [sym.from_zxing(x) for x in (f.EAN13, f.EAN8, f.UPCA, f.UPCE, f.Code128, f.QRCode)] == list(sym.ALL)
    assert sym.from_zxing(f.DataMatrix) is None
    assert sym.from_zxing("QR Code") == sym.QR


@pytest.mark.parametrize(("given", "expected"), [
    ((sym.EAN13, "0036000291452"), (sym.UPCA, "036000291452")),  # zbar/zxing UPC-A as EAN-13
    ((sym.UPCA, "0036000291452"), (sym.UPCA, "036000291452")),  # zxing-cpp 3 UPC-A text
    ((sym.UPCA, "036000291452"), (sym.UPCA, "036000291452")),
    ((sym.EAN13, "5901234123457"), (sym.EAN13, "5901234123457")),
    ((sym.UPCE, "0012345000065"), (sym.UPCE, "01234565")),  # zxing-cpp 3 expands UPC-E
    ((sym.UPCE, "012345000065"), (sym.UPCE, "01234565")),
    ((sym.UPCE, "01234565"), (sym.UPCE, "01234565")),
    ((sym.QR, "0036000291452"), (sym.QR, "0036000291452")),
])
def test_canonical(given: tuple[str, str], expected: tuple[str, str]) -> None:
    assert sym.canonical(*given) == expected


@pytest.mark.parametrize("upce", ["01234565", "04252614", "01234434", "11234565", "00000105"])
def test_compress_upca_inverts_expand(upce: str) -> None:
    from drivers.gs1 import expand_upce

    assert sym.compress_upca(expand_upce(upce)) == upce


def test_compress_upca_none_when_no_upce_form() -> None:
    assert sym.compress_upca("036000291452") is None
    assert sym.compress_upca("512345000065") is None
