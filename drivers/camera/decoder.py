"""The barcode pipeline: one grayscale image in, the validated codes it holds out.

Backends (chosen by measurement, see scripts/bench_decode.py and the README):

* ``zxing``   -- zxing-cpp on the whole frame, restricted to our six symbologies. Fast.
* ``pyzbar``  -- zbar on the whole frame: the reference, slower (worst on noisy frames).
* ``combined`` (default) -- zxing-cpp on the whole frame first. Only if it reads nothing,
  a cheap gradient detector (Sobel energy on a half-size copy, ~2 ms at 720p) proposes up
  to four barcode-like regions; each is cropped with its quiet zone, deskewed along its
  dominant gradient direction (rotated linear codes are what both libraries miss most) and
  tried with zxing-cpp, then zbar (crops over 1024 px are shrunk: zbar's time grows with
  pixels), then zxing-cpp once more at twice the size with an unsharp mask (small,
  defocused QR codes). The two libraries miss different symbols, so this reads more than
  either alone, or than both on the whole frame, while zbar only ever sees small crops.

No misreads: EAN/UPC texts are re-validated (check digit) and dropped when bad; where
results overlap in the image, those whose text validates win, partial reads (a text that
is a substring of another, an EAN-8/UPC-E inside an EAN-13) are dropped, and if two
backends still disagree on one place both are dropped. Code 128 and QR texts that are not
product codes are kept (``gtin`` None): ``decode`` prints them and the agent ignores them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from drivers.gs1 import classify
from drivers.camera import symbology as sym

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("combined", "zxing", "pyzbar")
DEFAULT_BACKEND = "combined"

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in frame pixels

_RETAIL_RANK = {sym.EAN13: 3, sym.UPCA: 3, sym.EAN8: 2, sym.UPCE: 1}


@dataclass(frozen=True)
class Decoded:
    """One code read from an image, in the names of spec/serial.md."""

    symbology: str
    text: str
    gtin: str | None


@dataclass(frozen=True)
class _Candidate:
    symbology: str
    text: str
    gtin: str | None
    valid: bool  # the text passes every check its form implies
    box: Box
    backend: str


# --------------------------------------------------------------------------- backends


class _Zxing:
    """zxing-cpp restricted to our symbologies; Plain text so GS1 strings match zbar's."""

    name = "zxing"

    def __init__(self) -> None:
        import zxingcpp

        self._z = zxingcpp
        f = zxingcpp.BarcodeFormat
        self._formats = [f.EAN13, f.EAN8, f.UPCA, f.UPCE, f.Code128, f.QRCode]

    def read(self, gray: np.ndarray, try_rotate: bool = True) -> list[tuple[str, str, np.ndarray]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            results = self._z.read_barcodes(
                gray, formats=self._formats, text_mode=self._z.TextMode.Plain,
                try_rotate=try_rotate, try_invert=False, try_downscale=True)
        out = []
        for r in results:
            name = sym.from_zxing(r.format)
            if name is None:
                continue
            extra = r.extra if isinstance(getattr(r, "extra", None), dict) else {}
            s, text = sym.canonical(name, r.text, extra.get("UPCE"))
            p = r.position
            pts = np.float32([[p.top_left.x, p.top_left.y], [p.top_right.x, p.top_right.y],
                              [p.bottom_right.x, p.bottom_right.y], [p.bottom_left.x, p.bottom_left.y]])
            out.append((s, text, pts))
        return out


class _Pyzbar:
    """zbar with exactly our symbologies enabled (UPC-A/UPC-E too, so it names them)."""

    name = "pyzbar"

    def __init__(self) -> None:
        from pyzbar import pyzbar
        from pyzbar.pyzbar import ZBarSymbol

        self._decode = pyzbar.decode
        self._symbols = [ZBarSymbol.EAN13, ZBarSymbol.EAN8, ZBarSymbol.UPCA, ZBarSymbol.UPCE,
                         ZBarSymbol.CODE128, ZBarSymbol.QRCODE]

    def read(self, gray: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        out = []
        for r in self._decode(np.ascontiguousarray(gray), symbols=self._symbols):
            name = sym.from_pyzbar(r.type)
            if name is None:
                continue
            try:
                text = r.data.decode("utf-8")
            except UnicodeDecodeError:
                text = r.data.decode("latin-1")
            s, text = sym.canonical(name, text)
            pts = np.float32([[p.x, p.y] for p in r.polygon]) if r.polygon else np.float32(
                [[r.rect.left, r.rect.top]])
            out.append((s, text, pts))
        return out


# --------------------------------------------------------------------------- preprocessing


def barcode_regions(gray: np.ndarray, max_regions: int = 4, threshold: int = 40) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) of regions dense in strong edges -- barcode-like structure.

    Works on a copy at most ~640 px wide: Sobel energy, 9x9 box mean, threshold, closing,
    connected components. About 1-2 ms for 720p; area-averaged downscaling suppresses
    sensor noise, so an empty noisy scene yields nothing unless it has printed clutter.
    """
    h, w = gray.shape[:2]
    f = max(1, round(max(w, h) / 640))
    small = cv2.resize(gray, (w // f, h // f), interpolation=cv2.INTER_AREA) if f > 1 else gray
    gx = cv2.convertScaleAbs(cv2.Sobel(small, cv2.CV_16S, 1, 0, ksize=3))
    gy = cv2.convertScaleAbs(cv2.Sobel(small, cv2.CV_16S, 0, 1, ksize=3))
    energy = cv2.blur(cv2.addWeighted(gx, 0.5, gy, 0.5, 0), (9, 9))
    _, mask = cv2.threshold(energy, threshold, 255, cv2.THRESH_BINARY)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (15, 15)))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    comps = sorted((stats[i] for i in range(1, n) if stats[i][4] >= 150), key=lambda s: -int(s[4]))
    boxes = []
    for x, y, bw, bh, _ in comps[:max_regions]:
        # Keep the quiet zone (about 10 modules each side of a 95-module EAN-13: ~11 %).
        margin = 12 + int(0.15 * max(bw, bh))
        boxes.append((max(0, int(x - margin) * f), max(0, int(y - margin) * f),
                      min(w, int(x + bw + margin) * f), min(h, int(y + bh + margin) * f)))
    return boxes


def deskew(crop: np.ndarray, min_angle: float = 4.0, min_coherence: float = 0.3) -> tuple[np.ndarray, np.ndarray] | None:
    """Rotate ``crop`` so its dominant edges are vertical (bars upright).

    Returns (rotated image, 2x3 affine mapping rotated -> crop coordinates), or None when
    the crop is already upright or has no single dominant direction (e.g. a QR code).
    """
    small = crop
    f = 1.0
    if max(crop.shape) > 400:
        f = 400 / max(crop.shape)
        small = cv2.resize(crop, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    gx = cv2.Sobel(small, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(small, cv2.CV_32F, 0, 1, ksize=3)
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    total = jxx + jyy
    if total <= 0:
        return None
    coherence = float(np.hypot(jxx - jyy, 2 * jxy) / total)
    angle = 0.5 * float(np.degrees(np.arctan2(2 * jxy, jxx - jyy)))
    if coherence < min_coherence or abs(angle) < min_angle:
        return None
    h, w = crop.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * sin + w * cos), int(h * cos + w * sin)
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    rotated = cv2.warpAffine(crop, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return rotated, cv2.invertAffineTransform(m)


# --------------------------------------------------------------------------- validation & merge


def _candidate(symbology: str, text: str, pts: np.ndarray, backend: str) -> _Candidate | None:
    """Validate one raw result; None for a retail code that fails its check digit."""
    gtin, reason = classify(text, symbology)
    if symbology in sym.RETAIL and gtin is None:
        log.debug("dropped %s %r from %s: %s", symbology, text, backend, reason or "malformed")
        return None
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return _Candidate(symbology, text, gtin, reason is None, (float(x0), float(y0), float(x1), float(y1)), backend)


def _overlap(a: Box, b: Box, pad: float = 4.0) -> bool:
    return a[0] - pad <= b[2] and b[0] - pad <= a[2] and a[1] - pad <= b[3] and b[1] - pad <= a[3]


def _covered(region: tuple[int, int, int, int], boxes: list[Box]) -> bool:
    """True when a decoded symbol covers most of ``region`` (nothing else to find there)."""
    rx0, ry0, rx1, ry1 = region
    area = max(1, (rx1 - rx0) * (ry1 - ry0))
    for x0, y0, x1, y1 in boxes:
        ix = max(0.0, min(rx1, x1) - max(rx0, x0))
        iy = max(0.0, min(ry1, y1) - max(ry0, y0))
        if ix * iy >= 0.35 * area:
            return True
    return False


def _resolve(group: list[_Candidate]) -> list[_Candidate]:
    """Pick what to believe among results that overlap in the image."""
    if any(c.valid for c in group):
        group = [c for c in group if c.valid]
    texts = {c.text for c in group}
    group = [c for c in group if not any(c.text != t and c.text in t for t in texts)]
    best_rank = max((_RETAIL_RANK.get(c.symbology, 0) for c in group), default=0)
    group = [c for c in group if c.symbology not in _RETAIL_RANK or _RETAIL_RANK[c.symbology] == best_rank]
    keys = {(c.symbology, c.text) for c in group}
    if len(keys) > 1 and len({c.backend for c in group}) > 1:
        log.info("decoders disagree on one symbol, dropping all of %s", sorted(keys))
        return []
    return group


def merge(candidates: list[_Candidate]) -> list[Decoded]:
    """Group overlapping candidates, resolve each group, dedup by (symbology, text)."""
    groups: list[list[_Candidate]] = []
    for c in candidates:
        hits = [g for g in groups if any(_overlap(c.box, o.box) for o in g)]
        merged = [c]
        for g in hits:
            merged.extend(g)
            groups.remove(g)
        groups.append(merged)
    kept = [c for g in groups for c in _resolve(g)]
    kept.sort(key=lambda c: (c.box[1], c.box[0]))
    out: list[Decoded] = []
    seen: set[tuple[str, str]] = set()
    for c in kept:
        if (c.symbology, c.text) not in seen:
            seen.add((c.symbology, c.text))
            out.append(Decoded(c.symbology, c.text, c.gtin))
    return out


# --------------------------------------------------------------------------- the pipeline


class BarcodePipeline:
    """Decode the codes in a grayscale frame. Holds no state between calls; use one
    instance per thread (the decoder libraries are not documented as re-entrant)."""

    def __init__(self, backend: str = DEFAULT_BACKEND, max_regions: int = 4, deskew_regions: bool = True,
                 region_pyzbar: bool = True, pyzbar_max_side: int = 1024, second_scale: bool = True,
                 upscale_max_side: int = 480) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown barcode backend {backend!r} (one of {', '.join(BACKENDS)})")
        self.backend = backend
        self.max_regions = max_regions
        self.deskew_regions = deskew_regions
        self.region_pyzbar = region_pyzbar
        self.pyzbar_max_side = pyzbar_max_side
        self.second_scale = second_scale
        self.upscale_max_side = upscale_max_side
        self._zxing = _Zxing() if backend in ("zxing", "combined") else None
        self._pyzbar = _Pyzbar() if backend in ("pyzbar", "combined") else None

    def decode(self, gray: np.ndarray) -> list[Decoded]:
        """The distinct valid codes in ``gray`` (2-D uint8; a BGR image is converted)."""
        gray = _as_gray(gray)
        if self.backend == "pyzbar":
            assert self._pyzbar is not None
            return merge(self._from(self._pyzbar.read(gray), "pyzbar"))
        assert self._zxing is not None
        cands = self._from(self._zxing.read(gray), "zxing")
        if self.backend == "combined" and not cands:
            cands = self._regions(gray)
        return merge(cands)

    def _from(self, raw: list[tuple[str, str, np.ndarray]], backend: str,
              offset: tuple[int, int] = (0, 0), inverse: np.ndarray | None = None) -> list[_Candidate]:
        out = []
        for s, text, pts in raw:
            if inverse is not None:
                pts = cv2.transform(pts.reshape(-1, 1, 2), inverse).reshape(-1, 2)
            c = _candidate(s, text, pts + np.float32(offset), backend)
            if c is not None:
                out.append(c)
        return out

    def _pyzbar_on(self, img: np.ndarray, offset: tuple[int, int], inverse: np.ndarray | None) -> list[_Candidate]:
        assert self._pyzbar is not None
        small, scale = _limit(img, self.pyzbar_max_side)
        raw = [(s, t, pts / scale) for s, t, pts in self._pyzbar.read(small)]
        return self._from(raw, "pyzbar", offset, inverse)

    def _regions(self, gray: np.ndarray) -> list[_Candidate]:
        """Second chance, when the whole-frame pass read nothing: barcode-like regions."""
        assert self._zxing is not None and self._pyzbar is not None
        found: list[_Candidate] = []
        for region in barcode_regions(gray, self.max_regions):
            if _covered(region, [c.box for c in found]):
                continue
            x0, y0, x1, y1 = region
            crop = gray[y0:y1, x0:x1]
            view, inverse = crop, None
            if self.deskew_regions:
                turned = deskew(crop)
                if turned is not None:
                    view, inverse = turned
            got = self._from(self._zxing.read(view, try_rotate=False), "zxing", (x0, y0), inverse)
            if not got and self.region_pyzbar:
                got = self._pyzbar_on(view, (x0, y0), inverse)
            if not got and self.second_scale and max(view.shape[:2]) <= self.upscale_max_side:
                raw = [(s, t, pts / 2.0) for s, t, pts in self._zxing.read(sharpened_2x(view), try_rotate=False)]
                got = self._from(raw, "zxing", (x0, y0), inverse)
            found.extend(got)
        return found


def sharpened_2x(img: np.ndarray) -> np.ndarray:
    """``img`` at twice the size (bicubic) with an unsharp mask.

    The pass that reads small, defocused QR codes: at 3 px per module a blur of 1.5 px
    merges modules below zxing's binarizer; enlarged and sharpened, they separate again.
    """
    big = cv2.resize(img, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC)
    return cv2.addWeighted(big, 2.0, cv2.GaussianBlur(big, (0, 0), 3.0), -1.0, 0)


def _limit(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``img`` shrunk (area-averaged) to at most ``max_side`` px, and the factor used.

    zbar's time grows with pixels; a big crop is a big (close-up) symbol whose modules
    survive halving, and the averaging even sharpens a defocused one relative to its size.
    """
    side = max(img.shape[:2])
    if side <= max_side:
        return img, 1.0
    f = max_side / side
    return cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA), f


def _as_gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        img = cv2.cvtColor(img, code)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)
