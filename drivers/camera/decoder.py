"""The barcode pipeline: one grayscale image in, the codes it surely holds out.

The same pipeline, with the same settings, serves the camera (in its child process) and
``cabinet-agent decode``. Default ``combined``, chosen by measurement (scripts/bench_decode.py):

1. **Find.** zxing-cpp on the whole frame, upright at full resolution (about 3 ms per 720p
   frame, half its full search). Only if it reads nothing, a cheap gradient detector
   proposes up to four barcode-like regions; each is cropped with its quiet zone,
   straightened, and tried with zxing-cpp, then zbar, then zxing-cpp at twice the size with
   an unsharp mask (small, defocused symbols). Only if those read nothing either, zxing-cpp's
   full search of the frame (turned, downscaled, inverted: e.g. a light-on-dark QR code).
2. **Confirm.** Around every linear symbol found, a small crop turned level (the direction
   measured across the bars) is read again by the views it lacks: zxing-cpp at 1.5x
   (bicubic: edges between pixels become visible, the binariser sees another image) and at
   2x sharpened; then, only while the place is not settled (one text, two independent
   views), zbar at 1x and 1.5x. A big symbol is viewed coarser instead of finer. zbar
   only ever sees small crops, so the cost stays low.
3. **Arbitrate** (``arbiter``): a code is reported only when independent evidence agrees;
   the pixel check (``bars``) confirms single reads, settles contested places and vetoes
   a misread both decoders share.

Either decoder may be missing (``backends``): the pipeline then runs with the other one and
says so in ``degraded``; without zxing-cpp, two zbar scales count as agreement.

``zxing`` and ``pyzbar`` are one library alone on the whole frame, check digits validated,
nothing else: the baselines the benchmark compares against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

from drivers.camera import bars
from drivers.camera import symbology as sym
from drivers.camera.arbiter import Arbiter, Decoded, Key, Rules, Verdict, evidence, is_linear, places
from drivers.camera.backends import ZBAR, ZXING, Backends, DecoderUnavailable, Read, load_backends
from drivers.camera.regions import as_gray, barcode_regions, deskew, limit, scaled, sharpened, sharpened_2x  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("combined", "zxing", "pyzbar")
DEFAULT_BACKEND = "combined"
FIND_ORDERS: tuple[str, ...] = ("quick", "full")
View = tuple[str, float]
# zxing-cpp first (cheap on a crop); zbar only where that left the place unsettled.
CONFIRM_VIEWS: tuple[View, ...] = ((ZXING, 1.5), (ZXING, 2.0), (ZBAR, 1.0), (ZBAR, 1.5))
# The whole frame's first pass: upright, full resolution, dark on light -- about half the cost of
# zxing-cpp's full search; on the generated set it reads a code on every frame the full search
# does but one of 360, on the real photos on all but 3 of 193 (two are light-on-dark QR codes).
QUICK = {"try_rotate": False, "try_invert": False, "try_downscale": False}
VIEW_MAX_SIDE = 1280  # a confirmation view larger than this is a big symbol: view it coarser
ZBAR_VIEW_MAX_SIDE = 1024  # zbar's time grows with pixels; big modules survive shrinking

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "BarcodePipeline", "Decoded", "Rules", "barcode_regions",
           "deskew", "sharpened_2x"]


def _quad(r: Read) -> np.ndarray:
    return np.asarray(r.quad, dtype=np.float32)


def _to_frame(reads: list[Read], scale: float, inverse: np.ndarray | None = None,
              offset: tuple[float, float] = (0.0, 0.0), view_scale: float | None = None) -> list[Read]:
    """Map reads made on a view (``scale`` x a crop) back to frame coordinates.

    ``inverse``: 2x3 affine crop -> frame (a rotated crop), else the crop is at ``offset``.
    """
    out = []
    for r in reads:
        pts: np.ndarray = np.asarray(r.quad, dtype=np.float32) / np.float32(scale)
        if inverse is not None:
            pts = np.asarray(cv2.transform(pts.reshape(-1, 1, 2), inverse)).reshape(-1, 2)
        pts = pts + np.asarray(offset, dtype=np.float32)
        quad = tuple((float(x), float(y)) for x, y in pts)
        out.append(r.mapped((quad[0], quad[1], quad[2], quad[3]), scale if view_scale is None else view_scale))
    return out


class BarcodePipeline:
    """Decode the codes in a grayscale frame. Holds no state between calls; use one
    instance per thread (the decoder libraries are not documented as re-entrant)."""

    def __init__(self, backend: str = DEFAULT_BACKEND, rules: Rules | None = None, max_regions: int = 4,
                 deskew_regions: bool = True, region_zbar: bool = True, zbar_max_side: int = 1024,
                 second_scale: bool = True, upscale_max_side: int = 480,
                 confirm_views: Sequence[View] = CONFIRM_VIEWS, backends: Backends | None = None,
                 crop_margin: float = 0.2, crop_band: float = 0.15, find_order: str = "quick") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown barcode backend {backend!r} (one of {', '.join(BACKENDS)})")
        if find_order not in FIND_ORDERS:
            raise ValueError(f"unknown find order {find_order!r} (one of {', '.join(FIND_ORDERS)})")
        self.backend = backend
        want = {"combined": (ZXING, ZBAR), "zxing": (ZXING,), "pyzbar": (ZBAR,)}[backend]
        self.backends = backends if backends is not None else load_backends(want)
        self._zx = self.backends.zxing if ZXING in want else None
        self._zb = self.backends.zbar if ZBAR in want else None
        if self._zx is None and self._zb is None:
            raise DecoderUnavailable(backend, self.backends.degraded or "no decoder")
        base = rules or Rules()
        if self._zx is None and not base.zbar_scales_agree:
            # Degraded: zbar is all there is; two of its scales must do (alarmed by the caller).
            base = Rules(**{**base.__dict__, "zbar_scales_agree": True})
        self.arbiter = Arbiter(base)
        self.max_regions = max_regions
        self.deskew_regions = deskew_regions
        self.region_zbar = region_zbar
        self.zbar_max_side = zbar_max_side
        self.second_scale = second_scale
        self.upscale_max_side = upscale_max_side
        self.confirm_views = tuple(v for v in confirm_views if self._has(v[0]))
        self.crop_margin = crop_margin
        self.crop_band = crop_band
        self.find_order = find_order

    @property
    def degraded(self) -> str | None:
        """Why the pipeline runs without one of its decoders, None when it has both."""
        return self.backends.degraded if self.backend == "combined" else None

    def _has(self, backend: str) -> bool:
        return (self._zx if backend == ZXING else self._zb) is not None

    # -- the pipeline ------------------------------------------------------------------------------

    def decode(self, gray: np.ndarray) -> list[Decoded]:
        """The distinct codes in ``gray`` we are sure of (2-D uint8; a BGR image is converted)."""
        return self.verdict(gray).codes

    def verdict(self, gray: np.ndarray) -> Verdict:
        """``decode`` with the reasons for everything dropped."""
        gray = as_gray(gray)
        reads = self.find(gray)
        if self.backend != "combined":
            return Verdict(codes=_distinct_valid(reads))
        reads += self.confirm(gray, reads)
        return self.arbiter.decide(reads, lambda place, keys: self.judge(gray, place, keys))

    def find(self, gray: np.ndarray) -> list[Read]:
        """Step 1: the cheap views first, the expensive ones only where those read nothing.

        ``combined``: zxing-cpp on the whole frame upright at full resolution (``QUICK``:
        about half the cost of its full search); if that reads nothing, the barcode-like
        regions (straightened, so a code at any angle is upright there); if those read
        nothing either, zxing-cpp's full search of the frame (turned 90 degrees, downscaled,
        inverted). ``find_order="full"``: the full search first, then the regions (the order
        before issue 10; the benchmark compares them). A library alone: its full search.
        """
        if self._zx is None:
            reads = self._zbar_on(gray, 1.0)
        elif self.backend != "combined" or self.find_order == "full":
            reads = self._zx.read(gray)
        else:
            reads = self._zx.read(gray, **QUICK)
            if not reads:
                reads = self._regions(gray) or self._zx.read(gray)
            return reads
        if not reads and self.backend == "combined":
            reads = self._regions(gray)
        return reads

    def confirm(self, gray: np.ndarray, reads: list[Read]) -> list[Read]:
        """Step 2: every linear place read again, upright, by the views it lacks -- zbar's
        only while the place is not settled (one text, two independent views)."""
        more: list[Read] = []
        for place in places(reads):
            if not is_linear(place[0].symbology):
                continue
            got = bars.upright_crop(gray, [_quad(r) for r in place], self.crop_margin, self.crop_band)
            if got is None:
                continue
            crop, m = got
            inverse = cv2.invertAffineTransform(m)
            seen = {r.view for r in place}
            found = list(place)
            module = _module_px(place, m)
            for backend, s in self.confirm_views:
                if backend == ZBAR and self._settled(found):
                    break
                cap = ZBAR_VIEW_MAX_SIDE if backend == ZBAR else VIEW_MAX_SIDE
                eff = view_scale(crop.shape, coarser(s, module), cap)
                if (backend, round(eff, 2)) in seen:
                    continue
                seen.add((backend, round(eff, 2)))
                # zxing-cpp's second view is sharpened too (a defocused symbol's edges back)
                view = sharpened(crop, eff) if backend == ZXING and s >= 2.0 else scaled(crop, eff)
                if backend == ZXING:
                    assert self._zx is not None
                    # a linear place: no QR detector (about a sixth of the view's cost, nothing to find)
                    raw = self._zx.read(view, try_rotate=False, try_invert=False, try_downscale=False,
                                        linear_only=True)
                    new = _to_frame(raw, eff, inverse)
                else:
                    assert self._zb is not None
                    new = _to_frame(self._zb.read(view), eff, inverse)
                found += new
                more += new
        return more

    def _settled(self, reads: list[Read]) -> bool:
        """One linear text at the place, with two independent views (rule 3)."""
        views: dict[Key, set[View]] = {}
        for r in reads:
            if is_linear(r.symbology):
                views.setdefault((r.symbology, r.text), set()).add(r.view)
        return len(views) == 1 and evidence(next(iter(views.values())), self.arbiter.rules) >= 2

    def judge(self, gray: np.ndarray, place: list[Read], keys: list[Key]) -> dict[Key, bars.PixelReading]:
        """The pixel reading of each EAN/UPC text at one place (``bars.read_pixels``)."""
        got = bars.upright_crop(gray, [_quad(r) for r in place])
        if got is None:
            return {}
        crop, m = got
        h = crop.shape[0]
        out: dict[Key, bars.PixelReading] = {}
        for key in keys:
            own = [r for r in place if (r.symbology, r.text) == key]
            if not own:
                continue
            pts = np.concatenate([cv2.transform(_quad(r).reshape(-1, 1, 2), m).reshape(-1, 2) for r in own])
            x0, x1 = float(pts[:, 0].min()), float(pts[:, 0].max())
            reading = bars.read_pixels(crop, key[0], key[1], x0, x1, 0.1 * h, 0.9 * h)
            if reading is not None:
                out[key] = reading
        return out

    # -- views ------------------------------------------------------------------------------------

    def _zbar_on(self, img: np.ndarray, scale: float, inverse: np.ndarray | None = None,
                 offset: tuple[float, float] = (0.0, 0.0)) -> list[Read]:
        """zbar on ``img`` (a view at ``scale``), shrunk first if big: its time grows with pixels."""
        if self._zb is None:
            return []
        small, f = limit(img, self.zbar_max_side)
        return _to_frame(self._zb.read(small), scale * f, inverse, offset)

    def _regions(self, gray: np.ndarray) -> list[Read]:
        """Barcode-like regions of a frame whose whole-frame pass read nothing, the largest
        first, until one reads: the rest of a noisy frame's regions (texture, edges) cost three
        reads each and found nothing on any real photo or generated frame (720p p95 36 -> 23 ms
        in one run); a second code waits until the first leaves the view, as after the quick pass."""
        found: list[Read] = []
        for region in barcode_regions(gray, self.max_regions):
            if _covered(region, [r.box for r in found]):
                continue
            x0, y0, x1, y1 = region
            crop = gray[y0:y1, x0:x1]
            view, inverse = crop, None
            if self.deskew_regions:
                turned = deskew(crop)
                if turned is not None:
                    view, inverse = turned
            got: list[Read] = []
            if self._zx is not None:
                got = _to_frame(self._zx.read(view, try_rotate=False, try_invert=False), 1.0, inverse, (x0, y0))
            if not got and self.region_zbar:
                got = self._zbar_on(view, 1.0, inverse, (x0, y0))
            if (not got and self._zx is not None and self.second_scale
                    and max(view.shape[:2]) <= self.upscale_max_side):
                raw = self._zx.read(sharpened_2x(view), try_rotate=False, try_invert=False)
                got = _to_frame(raw, 2.0, inverse, (x0, y0))
            found.extend(got)
            if found:
                break
        return found


_MODULES = {sym.EAN13: 95, sym.UPCA: 95, sym.EAN8: 67, sym.UPCE: 51}
FINE_BELOW_PX = 3.0  # modules narrower than this are viewed finer (enlarged) to confirm


def _modules(symbology: str, text: str) -> int | None:
    """Modules across a symbol: fixed for EAN/UPC; for Code 128 about 11 per character
    (two digits per character in code set C) plus start, check and stop."""
    if symbology == sym.CODE128:
        chars = (len(text) + 1) // 2 if text.isdigit() else len(text)
        return 11 * (chars + 3) + 2
    return _MODULES.get(symbology)


def _module_px(place: list[Read], m: np.ndarray) -> float:
    """The symbol's module width in frame pixels (small, i.e. "view finer", when unknown)."""
    widths = []
    for r in place:
        n = _modules(r.symbology, r.text)
        if n:
            pts = np.asarray(cv2.transform(_quad(r)[:2].reshape(-1, 1, 2), m)).reshape(-1, 2)
            widths.append(abs(float(pts[1, 0] - pts[0, 0])) / n)
    return max(widths) if widths else 0.0


def coarser(scale: float, module_px: float) -> float:
    """A confirmation view's factor for a symbol of ``module_px``: thin modules are enlarged
    (1.5x, 2x: edges between pixels become visible); a symbol with wide modules gains nothing
    from that and is viewed coarser instead (1/1.5, and 1/2 from 4.5 px on): a different
    view of it, and a cheap one."""
    if scale <= 1.0 or module_px < FINE_BELOW_PX:
        return scale
    if scale >= 2.0 and module_px < 1.5 * FINE_BELOW_PX:
        return 1.0 / 1.5
    if scale < 2.0 and module_px < 1.5 * FINE_BELOW_PX:
        return scale
    return 1.0 / scale


def view_scale(shape: tuple[int, ...], scale: float, max_side: int) -> float:
    """The scale a confirmation view is made at: ``scale`` while the view stays within
    ``max_side``; a crop too big for that is a big symbol, which gains nothing from being
    enlarged -- it is viewed at ``1/scale`` instead (a different view, and a cheap one)."""
    side = max(shape[:2])
    eff = min(scale, max_side / side)
    if eff < 1.1 and scale > 1.0:
        eff = min(1.0 / scale, max_side / side)
    elif scale <= 1.0:
        eff = min(scale, max_side / side)
    return eff


def _covered(region: tuple[int, int, int, int], boxes: list[tuple[float, float, float, float]]) -> bool:
    """True when a decoded symbol covers most of ``region`` (nothing else to find there)."""
    rx0, ry0, rx1, ry1 = region
    area = max(1, (rx1 - rx0) * (ry1 - ry0))
    for x0, y0, x1, y1 in boxes:
        ix = max(0.0, min(rx1, x1) - max(rx0, x0))
        iy = max(0.0, min(ry1, y1) - max(ry0, y0))
        if ix * iy >= 0.35 * area:
            return True
    return False


def _distinct_valid(reads: list[Read]) -> list[Decoded]:
    """A library alone: every distinct read whose retail check digit is right."""
    from drivers.gs1 import classify

    out: list[Decoded] = []
    seen: set[Key] = set()
    for r in reads:
        gtin = classify(r.text, r.symbology)[0]
        if r.symbology in sym.RETAIL and gtin is None:
            continue
        if (r.symbology, r.text) not in seen:
            seen.add((r.symbology, r.text))
            out.append(Decoded(r.symbology, r.text, gtin))
    return out
