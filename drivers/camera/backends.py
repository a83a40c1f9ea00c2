"""The two barcode decoder libraries, each optional, behind one small interface.

zxing-cpp and zbar (through pyzbar's ctypes binding to libzbar) are both native code: either
may be missing on a cabinet (no wheel for the board, no ``libzbar0`` package), so each is
loaded on its own and a missing one is reported, not fatal (spec/operations.md: "a missing
optional part ... does not stop the daemon: it runs without it and raises an alarm").

Each ``read`` returns ``Read`` objects in the coordinates of the image it was given; the
pipeline maps them back to the frame. zbar is driven through pyzbar's low-level wrapper,
not ``pyzbar.decode``: that function raises ``ValueError`` when zbar reports an orientation
it cannot name and loses every symbol of the image (pyzbar 0.1.9, seen on real QR photos).
"""

from __future__ import annotations

import ctypes
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers.camera import symbology as sym
from drivers.errors import DriverError

log = logging.getLogger(__name__)

ZXING = "zxing"
ZBAR = "zbar"

Point = tuple[float, float]
Quad = tuple[Point, Point, Point, Point]  # reading start, reading end, then the far side


class DecoderUnavailable(DriverError):
    """A decoder library cannot be loaded (not installed, or its native library is missing)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} unavailable: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class Read:
    """One symbol one decoder read on one view of the frame (frame coordinates once mapped).

    ``quad`` runs along the reading direction first (start of the symbol, end of it), then
    back along the far side, so ``quad[1] - quad[0]`` is the reading direction. ``scale`` is
    the view's magnification relative to the frame (1.0, 1.5, ...). ``charset_guess`` marks
    text whose bytes the decoder turned into characters by guessing an encoding.
    """

    symbology: str
    text: str
    backend: str
    scale: float
    quad: Quad
    charset_guess: bool = False

    @property
    def view(self) -> tuple[str, float]:
        """The piece of evidence this read is: one decoder at one scale."""
        return self.backend, round(self.scale, 2)

    @property
    def box(self) -> tuple[float, float, float, float]:
        xs = [p[0] for p in self.quad]
        ys = [p[1] for p in self.quad]
        return min(xs), min(ys), max(xs), max(ys)

    def mapped(self, quad: Quad, scale: float) -> Read:
        return Read(self.symbology, self.text, self.backend, scale, quad, self.charset_guess)


def _quad(points: Sequence[Sequence[float]]) -> Quad:
    p = [(float(x), float(y)) for x, y in points]
    if len(p) == 1:
        p = p * 4
    elif len(p) == 2:
        p = [p[0], p[1], p[1], p[0]]
    elif len(p) == 3:
        p = [p[0], p[1], p[2], p[2]]
    return p[0], p[1], p[2], p[3]


class ZxingBackend:
    """zxing-cpp restricted to our six symbologies; Plain text so GS1 strings match zbar's."""

    name = ZXING

    def __init__(self) -> None:
        try:
            import zxingcpp
        except Exception as exc:  # ImportError, or a broken native extension (OSError)
            raise DecoderUnavailable(ZXING, f"{type(exc).__name__}: {exc}") from exc
        self._z: Any = zxingcpp
        f = zxingcpp.BarcodeFormat
        self._linear = [f.EAN13, f.EAN8, f.UPCA, f.UPCE, f.Code128]
        self._formats = [*self._linear, f.QRCode]

    def read(self, gray: np.ndarray, try_rotate: bool = True, try_invert: bool = True,
             try_downscale: bool = True, linear_only: bool = False) -> list[Read]:
        """``linear_only``: no QR detector (a confirmation view of a linear symbol)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            results = self._z.read_barcodes(
                gray, formats=self._linear if linear_only else self._formats, text_mode=self._z.TextMode.Plain,
                try_rotate=try_rotate, try_invert=try_invert, try_downscale=try_downscale)
        out = []
        for r in results:
            name = sym.from_zxing(r.format)
            if name is None:
                continue
            extra = r.extra if isinstance(getattr(r, "extra", None), dict) else {}
            s, text = sym.canonical(name, r.text, extra.get("UPCE"))
            p = r.position
            quad = _quad([(p.top_left.x, p.top_left.y), (p.top_right.x, p.top_right.y),
                          (p.bottom_right.x, p.bottom_right.y), (p.bottom_left.x, p.bottom_left.y)])
            out.append(Read(s, text, ZXING, 1.0, quad))
        return out


class ZbarBackend:
    """zbar with exactly our symbologies enabled (UPC-A/UPC-E too, so it names them)."""

    name = ZBAR
    _GRAY = 808466521  # fourcc 'Y800'

    def __init__(self) -> None:
        try:
            from pyzbar import wrapper as w
        except Exception as exc:  # ImportError: no pyzbar, or libzbar not found
            raise DecoderUnavailable(ZBAR, f"{type(exc).__name__}: {exc}") from exc
        self._w: Any = w
        zs = w.ZBarSymbol
        self._types = {int(zs.EAN13): "EAN13", int(zs.EAN8): "EAN8", int(zs.UPCA): "UPCA",
                       int(zs.UPCE): "UPCE", int(zs.CODE128): "CODE128", int(zs.QRCODE): "QRCODE"}
        scanner = self._new_scanner()  # fails here, not on the first frame, if libzbar is broken
        w.zbar_image_scanner_destroy(scanner)

    def _new_scanner(self) -> Any:
        """A scanner with exactly our symbologies. A fresh one per image: a reused zbar scanner
        was measured to report different symbol outlines for the same image on later scans."""
        w = self._w
        scanner = w.zbar_image_scanner_create()
        if not scanner:
            raise DecoderUnavailable(ZBAR, "zbar_image_scanner_create failed")
        enable = w.ZBarConfig.CFG_ENABLE
        w.zbar_image_scanner_set_config(scanner, w.ZBarSymbol.NONE, enable, 0)  # symbology 0: all of them
        for code in self._types:
            w.zbar_image_scanner_set_config(scanner, code, enable, 1)
        return scanner

    def read(self, gray: np.ndarray) -> list[Read]:
        w = self._w
        img = np.ascontiguousarray(gray, dtype=np.uint8)
        h, wd = img.shape[:2]
        if h < 1 or wd < 1:
            return []
        data = img.tobytes()
        scanner = self._new_scanner()
        image = w.zbar_image_create()
        if not image:
            w.zbar_image_scanner_destroy(scanner)
            return []
        out: list[Read] = []
        try:
            w.zbar_image_set_format(image, self._GRAY)
            w.zbar_image_set_size(image, wd, h)
            w.zbar_image_set_data(image, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), len(data), None)
            if w.zbar_scan_image(scanner, image) < 0:
                return []
            symbol = w.zbar_image_first_symbol(image)
            while symbol:
                read = self._read_symbol(symbol)
                if read is not None:
                    out.append(read)
                symbol = w.zbar_symbol_next(symbol)
        finally:
            w.zbar_image_destroy(image)
            w.zbar_image_scanner_destroy(scanner)
        return out

    def _read_symbol(self, symbol: Any) -> Read | None:
        w = self._w
        name = sym.from_pyzbar(self._types.get(int(symbol.contents.type), ""))
        if name is None:
            return None
        raw = ctypes.string_at(w.zbar_symbol_get_data(symbol), w.zbar_symbol_get_data_length(symbol))
        guessed = False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        if name == sym.QR and not text.isascii():
            # zbar guesses the character set of QR byte segments (Shift-JIS, Big5, ...) and
            # its text is then not the symbol's: only zxing-cpp follows ECI and the defaults.
            guessed = True
        s, text = sym.canonical(name, text)
        n = w.zbar_symbol_get_loc_size(symbol)
        pts = np.asarray([[w.zbar_symbol_get_loc_x(symbol, i), w.zbar_symbol_get_loc_y(symbol, i)]
                          for i in range(n)], dtype=np.float32) if n else np.zeros((1, 2), np.float32)
        return Read(s, text, ZBAR, 1.0, _oriented_quad(pts, _orientation(w, symbol)), guessed)


def _orientation(w: Any, symbol: Any) -> int:
    """zbar's orientation (0 up, 1 right, 2 down, 3 left), -1 when it has none."""
    fn = getattr(w, "zbar_symbol_get_orientation", None)
    if fn is None:
        return -1
    try:
        return int(fn(symbol))
    except Exception:  # noqa: BLE001 - an old libzbar without the symbol
        return -1


def _oriented_quad(pts: np.ndarray, orientation: int) -> Quad:
    """The bounding rectangle of zbar's scan points, ordered along the reading direction."""
    x0, y0 = (float(v) for v in pts.min(axis=0))
    x1, y1 = (float(v) for v in pts.max(axis=0))
    tl, tr, br, bl = (x0, y0), (x1, y0), (x1, y1), (x0, y1)
    if orientation == 1:  # reading downwards
        return tl, bl, br, tr
    if orientation == 2:  # right to left
        return br, bl, tl, tr
    if orientation == 3:  # reading upwards
        return br, tr, tl, bl
    return tl, tr, br, bl


@dataclass
class Backends:
    """The decoders that loaded, and why the others did not."""

    zxing: ZxingBackend | None
    zbar: ZbarBackend | None
    missing: dict[str, str]

    @property
    def names(self) -> list[str]:
        return [b.name for b in (self.zxing, self.zbar) if b is not None]

    @property
    def degraded(self) -> str | None:
        """One line for the operator when a decoder is missing, else None."""
        if not self.missing:
            return None
        return "; ".join(f"{name} unavailable: {reason}" for name, reason in sorted(self.missing.items()))


def load_backends(want: Sequence[str] = (ZXING, ZBAR)) -> Backends:
    """Load the wanted decoders that are installed; a missing one is logged and listed."""
    zx: ZxingBackend | None = None
    zb: ZbarBackend | None = None
    missing: dict[str, str] = {}
    if ZXING in want:
        try:
            zx = ZxingBackend()
        except DecoderUnavailable as exc:
            missing[ZXING] = exc.reason
            log.info("%s", exc)  # the caller reports it (an alarm, a line on stderr)
    if ZBAR in want:
        try:
            zb = ZbarBackend()
        except DecoderUnavailable as exc:
            missing[ZBAR] = exc.reason
            log.info("%s", exc)  # the caller reports it (an alarm, a line on stderr)
    return Backends(zx, zb, missing)
