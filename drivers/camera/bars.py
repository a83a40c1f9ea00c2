"""The pixel check: which of several EAN/UPC texts read at one place do the pixels support?

Both decoders sometimes read a blurred or aliased EAN/UPC symbol as another valid code (the
check digit catches only some errors): on real photos zbar repeats such a misread on every
scale, and zxing-cpp reads the right code at one scale and a wrong one at another. Counting
votes cannot settle that. But a text fixes its symbol's exact bar pattern (95 modules for
EAN-13/UPC-A, 67 for EAN-8, 51 for UPC-E), so the image itself can be asked: along scan lines
across the symbol, sample the grey level at the centre of every module -- for the best start
and module width, searched around where the decoders put the symbol -- and take the normalised
correlation with the text's pattern (dark = bar). Centre samples are what blur spoils least.
A symbol's best lines are the evidence (the rest may cross its digits or a glare), so a
text's score is the mean of its best few lines. The text that explains the pixels best by a
clear margin wins; ``arbiter`` decides what "clear" is and what happens otherwise.

Pure numpy on an upright crop (bars vertical); ``upright_crop`` makes one from the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from drivers.camera import symbology as sym
from drivers.gs1 import classify

_L = ("0001101", "0011001", "0010011", "0111101", "0100011",
      "0110001", "0101111", "0111011", "0110111", "0001011")
_R = tuple("".join("1" if c == "0" else "0" for c in code) for code in _L)
_G = tuple(code[::-1] for code in _R)
# EAN-13: the parity of the six left digits encodes the first digit.
_EAN13_PARITY = ("LLLLLL", "LLGLGG", "LLGGLG", "LLGGGL", "LGLLGG",
                 "LGGLLG", "LGGGLL", "LGLGLG", "LGLGGL", "LGGLGL")
# UPC-E, number system 0: the parity of the six digits encodes the check digit (1: inverted).
_UPCE_PARITY = ("GGGLLL", "GGLGLL", "GGLLGL", "GGLLLG", "GLGGLL",
                "GLLGGL", "GLLLGG", "GLGLGL", "GLGLLG", "GLLGLG")

LINES = 9  # scan lines sampled across the symbol
BEST_LINES = 4  # the score is the mean correlation of this many best lines
SHIFT_MODULES = 3.0  # start searched within +-3 modules of where the decoders put it
WIDTH_SPREAD = 0.10  # module width searched within +-10 % (tilt, perspective)
# Quiet zone: the 2nd to 5th module beyond each guard (GS1 asks for >= 7 light modules; an
# add-on may start after 7), where nothing may be as dark as the symbol's own bars.
QUIET_NEAR, QUIET_FAR = 1, 5
QUIET_MAX_Z = 1.0


def pattern(symbology: str, text: str) -> np.ndarray | None:
    """The module pattern (1 = bar) of an EAN/UPC text in our reported form, None otherwise."""
    if not text.isdigit():
        return None
    bits: str
    if symbology in (sym.EAN13, sym.UPCA) and len(text) in (12, 13):
        t = text if len(text) == 13 else "0" + text
        left = "".join((_L if p == "L" else _G)[int(c)] for p, c in zip(_EAN13_PARITY[int(t[0])], t[1:7], strict=True))
        bits = "101" + left + "01010" + "".join(_R[int(c)] for c in t[7:]) + "101"
    elif symbology == sym.EAN8 and len(text) == 8:
        bits = ("101" + "".join(_L[int(c)] for c in text[:4]) + "01010"
                + "".join(_R[int(c)] for c in text[4:]) + "101")
    elif symbology == sym.UPCE and len(text) == 8 and text[0] in "01":
        parity = _UPCE_PARITY[int(text[7])]
        if text[0] == "1":
            parity = "".join("L" if p == "G" else "G" for p in parity)
        digits = "".join((_L if p == "L" else _G)[int(c)] for p, c in zip(parity, text[1:7], strict=True))
        bits = "101" + digits + "010101"
    else:
        return None
    return np.frombuffer(bits.encode(), np.uint8) - ord("0")


def _unit(bits: np.ndarray) -> np.ndarray:
    b = bits.astype(np.float32) - float(bits.mean())
    return b / float(np.linalg.norm(b))


@dataclass(frozen=True)
class Alignment:
    """Where a pattern sits on one scan line: first module's left edge, module width, sense."""

    score: float  # normalised correlation of the module centres with the pattern
    start: float
    width: float
    reverse: bool


def _sample(profiles: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of every line at ``pos`` ((L, ...) per line, or shared)."""
    width = profiles.shape[1]
    p = np.clip(pos, 0.0, width - 1.001)
    i0 = p.astype(np.int64)
    frac = (p - i0).astype(np.float32)
    if pos.ndim and pos.shape[0] == profiles.shape[0] and pos.ndim > 1:
        flat_i = i0.reshape(len(profiles), -1)
        a = np.take_along_axis(profiles, flat_i, axis=1).reshape(pos.shape)
        b = np.take_along_axis(profiles, flat_i + 1, axis=1).reshape(pos.shape)
        return np.asarray(a + (b - a) * frac)
    a, b = profiles[:, i0], profiles[:, i0 + 1]
    return np.asarray(a + (b - a) * frac[None])


def _scores(v: np.ndarray, fwd: np.ndarray, rev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = v - v.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(v, axis=-1)
    norm[norm == 0] = np.inf
    return (v @ fwd) / norm, (v @ rev) / norm


def align_lines(profiles: np.ndarray, bits: np.ndarray, start: float, end: float) -> list[Alignment]:
    """The best alignment of ``bits`` on each line (rows of darkness ``profiles``), searched
    around the decoders' ``start``/``end``: +-3 modules, +-10 % module width, either sense.
    A coarse grid (half modules) for all lines at once, then a fine one around each best."""
    n = len(bits)
    width = profiles.shape[1]
    fwd, rev = _unit(bits), _unit(bits[::-1])
    w0 = max(0.5, (end - start) / n)
    centres = np.arange(n, dtype=np.float32) + 0.5
    widths = w0 * np.linspace(1 - WIDTH_SPREAD, 1 + WIDTH_SPREAD, 7, dtype=np.float32)
    starts = start + w0 * np.arange(-SHIFT_MODULES, SHIFT_MODULES + 1e-6, 0.5, dtype=np.float32)
    pos = starts[None, :, None] + centres[None, None, :] * widths[:, None, None]  # (Wd, S, n)
    f, r = _scores(_sample(profiles, pos), fwd, rev)  # (L, Wd, S)
    inside = (pos[:, :, 0] >= 0) & (pos[:, :, -1] <= width - 1)
    coarse = np.where(inside[None], np.maximum(f, r), -1.0).reshape(len(profiles), -1)
    best = np.argmax(coarse, axis=1)
    bw = widths[best // len(starts)]
    bs = starts[best % len(starts)]
    fine_w = bw[:, None] + w0 * np.linspace(-0.035, 0.035, 9, dtype=np.float32)[None]  # (L, 9)
    fine_s = bs[:, None] + w0 * np.linspace(-0.5, 0.5, 9, dtype=np.float32)[None]
    pos2 = fine_s[:, None, :, None] + centres[None, None, None, :] * fine_w[:, :, None, None]  # (L, 9, 9, n)
    f2, r2 = _scores(_sample(profiles, pos2), fwd, rev)
    inside2 = (pos2[..., 0] >= 0) & (pos2[..., -1] <= width - 1)
    fine = np.where(inside2, np.maximum(f2, r2), -1.0).reshape(len(profiles), -1)
    pick = np.argmax(fine, axis=1)
    out = []
    for line, k in enumerate(pick):
        i, j = divmod(int(k), 9)
        out.append(Alignment(float(fine[line, k]), float(fine_s[line, j]), float(fine_w[line, i]),
                             bool(r2[line, i, j] > f2[line, i, j])))
    return out


def _lines(crop: np.ndarray, y0: float, y1: float) -> np.ndarray:
    """Darkness profiles (one row each) of ``LINES`` rows across the band, each three pixel
    rows averaged (sensor noise down; the bars are vertical, so they are unchanged)."""
    h = crop.shape[0]
    out = []
    for y in np.linspace(max(0.0, y0), min(h - 1.0, y1), LINES):
        r = int(round(float(y)))
        out.append(-crop[max(0, r - 1):r + 2].astype(np.float32).mean(axis=0))  # only the rows used
    return np.stack(out)


def fit(crop: np.ndarray, bits: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    """How well ``bits`` explains the upright ``crop``: mean of the best lines' correlations.

    ``x0``/``x1`` is where the decoders say the symbol starts and ends, ``y0``/``y1`` the band
    of rows to sample. 1.0 is a perfect fit; a wrong text of the same length scores lower
    because its bars disagree with the pixels at the modules where the texts differ.
    """
    scores = sorted((a.score for a in align_lines(_lines(crop, y0, y1), bits, x0, x1)), reverse=True)
    return float(np.mean(scores[:BEST_LINES]))


# -- reading the pixels a third way ------------------------------------------------------------------

@dataclass(frozen=True)
class PixelReading:
    """What the module centres say about a decoded text at its place.

    ``text``: the valid text (our reported form) that best explains the centre samples on
    the decoded text's own alignment -- a maximum-likelihood read under the check digit,
    independent of the decoders' edge detection; None if none can be formed. It is only
    ever used to *confirm* (the best of 10^12 texts often beats the true one by a little
    on a blurred or curved symbol, so a different text is no contradiction). ``quiet``: on
    some line the quiet zones beside both guards are light (a piece of a longer symbol has
    bars there on every line). ``fit``: the decoded text's score (``fit``).
    """

    text: str | None
    quiet: bool
    fit: float


def _codes(kind: str) -> np.ndarray:
    table = {"L": _L, "G": _G, "R": _R}[kind]
    return np.array([[1.0 if c == "1" else -1.0 for c in code] for code in table], np.float32)


def _digit_scores(z: np.ndarray, offsets: list[int], kind: str) -> np.ndarray:
    """(positions x 10): agreement of the 7 samples at each digit offset with each code."""
    codes = _codes(kind)
    return np.stack([codes @ z[o:o + 7] for o in offsets])


def _best_with_check(scores: np.ndarray, weights: list[int], fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digits maximising the summed scores under the check digit, for several prefixes at once.

    ``scores``: (P, positions, 10) per prefix; ``fixed``: (P,) the prefix's contribution to the
    weighted sum. Returns (best total per prefix, digits (P, positions)) with
    sum(weight * digit) + fixed = 0 (mod 10); -inf where no digits satisfy it (never: the
    last digit can always make it). A dynamic programme over the sum modulo 10.
    """
    prefixes, positions, _ = scores.shape
    best = np.full((prefixes, 10), -np.inf)
    best[np.arange(prefixes), fixed % 10] = 0.0
    back = np.zeros((positions, prefixes, 10), np.int64)
    states = np.arange(10)
    for k, w in enumerate(weights):
        # cand[p, d, s'] = best[p, (s' - w d) mod 10] + scores[p, k, d]
        prev = (states[None, :] - w * states[:, None]) % 10  # (d, s') -> previous state
        cand = best[:, prev] + scores[:, k, :, None]
        back[k] = np.argmax(cand, axis=1)
        best = np.max(cand, axis=1)
    digits = np.zeros((prefixes, positions), np.int64)
    state = np.zeros(prefixes, np.int64)
    rows = np.arange(prefixes)
    for k in range(positions - 1, -1, -1):
        d = back[k][rows, state]
        digits[:, k] = d
        state = (state - weights[k] * d) % 10
    return best[:, 0], digits


def _ml_text(symbology: str, z: np.ndarray) -> str | None:
    """The best valid text of ``symbology`` for normalised centre samples ``z`` (+1 = bar)."""
    if symbology in (sym.EAN13, sym.UPCA):
        left = [3 + 7 * i for i in range(6)]
        right = [50 + 7 * i for i in range(6)]
        lsc, gsc, rsc = _digit_scores(z, left, "L"), _digit_scores(z, left, "G"), _digit_scores(z, right, "R")
        # per first digit: its parity picks L or G codes for the six left digits
        par = np.array([[p == "G" for p in _EAN13_PARITY[f]] for f in range(10)])  # (10, 6)
        left_sc = np.where(par[:, :, None], gsc[None], lsc[None])  # (10, 6, 10)
        sc = np.concatenate([left_sc, np.broadcast_to(rsc[None], (10, 6, 10))], axis=1)
        totals, digits = _best_with_check(sc, [3, 1] * 6, np.arange(10))
        first = int(np.argmax(totals))
        text = str(first) + "".join(map(str, digits[first]))
        return text[1:] if text[0] == "0" else text  # EAN-13 with a leading 0 is a UPC-A
    if symbology == sym.EAN8:
        sc = np.concatenate([_digit_scores(z, [3 + 7 * i for i in range(4)], "L"),
                             _digit_scores(z, [36 + 7 * i for i in range(4)], "R")])[None]
        _, digits = _best_with_check(sc, [3, 1] * 4, np.zeros(1, np.int64))
        return "".join(map(str, digits[0]))
    if symbology == sym.UPCE:
        offs = [3 + 7 * i for i in range(6)]
        lsc, gsc = _digit_scores(z, offs, "L"), _digit_scores(z, offs, "G")
        best_e: tuple[float, str] | None = None
        parity: str
        for ns in (0, 1):
            for check in range(10):
                parity = _UPCE_PARITY[check]
                if ns == 1:
                    parity = "".join("L" if p == "G" else "G" for p in parity)
                rows = [lsc[i] if p == "L" else gsc[i] for i, p in enumerate(parity)]
                six = "".join(str(int(np.argmax(r))) for r in rows)
                total = float(sum(float(r.max()) for r in rows))
                text = f"{ns}{six}{check}"
                if classify(text, sym.UPCE)[0] is not None and (best_e is None or total > best_e[0]):
                    best_e = (total, text)
        return best_e[1] if best_e else None
    return None


_GUARDS = {95: list(range(3)) + list(range(45, 50)) + list(range(92, 95)),
           67: list(range(3)) + list(range(31, 36)) + list(range(64, 67)),
           51: list(range(3)) + list(range(45, 51))}


_HALVES = {95: (50, 45), 67: (36, 31)}  # line-order halves overlap on the centre guard


def _piecewise(profile: np.ndarray, bits: np.ndarray, a: Alignment) -> np.ndarray:
    """Module-centre positions (line order, ``QUIET_FAR`` modules of quiet zone each side)
    with each half of the symbol aligned on its own around the line's alignment: a symbol
    seen at an angle or on a curved pack has a module width that drifts along the line,
    which one straight alignment turns into misplaced end digits."""
    n = len(bits)
    idx = np.arange(-QUIET_FAR, n + QUIET_FAR, dtype=np.float32) + 0.5
    out = a.start + idx * a.width
    if n not in _HALVES:
        return out
    first_end, second_start = _HALVES[n]
    middle = (first_end + second_start) / 2.0
    prof = profile[None, :]
    shifts = np.arange(-1.0, 1.0 + 1e-6, 0.25, dtype=np.float32) * a.width
    scales = np.linspace(0.97, 1.03, 5, dtype=np.float32)
    for lo, hi, anchor in ((0, first_end, 0.0), (second_start, n, float(n))):
        j = np.arange(lo, hi, dtype=np.float32) + 0.5
        # scaled about the half's outer guard (where the decoders put it), then shifted
        edge = a.start + anchor * a.width
        pos = edge + (j[None, None, :] - anchor) * a.width * scales[:, None, None] + shifts[None, :, None]
        unit = _unit(bits[lo:hi])
        corr, _ = _scores(_sample(prof, pos)[0], unit, unit)
        k = int(np.argmax(corr))
        scale, shift = scales[k // len(shifts)], shifts[k % len(shifts)]
        side = idx < middle if anchor == 0.0 else idx >= middle
        out[side] = (edge + (idx - anchor) * a.width * scale + shift)[side]
    return out


def read_pixels(crop: np.ndarray, symbology: str, text: str, x0: float, x1: float, y0: float, y1: float
                ) -> PixelReading | None:
    """Re-read the symbol a decoder reported as ``text`` from the module centres (see
    ``PixelReading``); None when ``text`` is no EAN/UPC or the band has no usable line."""
    bits = pattern(symbology, text)
    if bits is None:
        return None
    n = len(bits)
    lines = _lines(crop, y0, y1)
    aligned = sorted(zip(align_lines(lines, bits, x0, x1), lines, strict=True), key=lambda a: -a[0].score)[:BEST_LINES]
    if not aligned or aligned[0][0].score <= 0:
        return None
    guards = np.array(_GUARDS[n])
    z_sum = np.zeros(n, np.float32)
    quiet_votes = []
    for a, profile in aligned:
        fwd = bits[::-1] if a.reverse else bits  # the pattern in line order
        pos = _piecewise(profile, fwd, a)  # module centres, line order, quiet zones included
        inside = (pos >= 0) & (pos <= len(profile) - 1)
        v = np.interp(pos, np.arange(len(profile), dtype=np.float32), profile)
        if a.reverse:  # pattern order
            v, inside = v[::-1], inside[::-1]
        body = v[QUIET_FAR:QUIET_FAR + n]
        bar_level = float(body[guards][bits[guards] == 1].mean())
        space_level = float(body[guards][bits[guards] == 0].mean())
        half = (bar_level - space_level) / 2.0
        if half <= 0:
            continue
        z = (v - (bar_level + space_level) / 2.0) / half
        z_sum += z[QUIET_FAR:QUIET_FAR + n]
        zone = np.concatenate([np.arange(0, QUIET_FAR - QUIET_NEAR), np.arange(QUIET_FAR + n + QUIET_NEAR, len(v))])
        zone = zone[inside[zone]]
        if len(zone):
            quiet_votes.append(float(z[zone].max()) < QUIET_MAX_Z)
    if not quiet_votes and not z_sum.any():
        return None
    ml = _ml_text(symbology, z_sum)
    other = symbology
    if ml is not None and symbology in (sym.EAN13, sym.UPCA):
        other = sym.UPCA if len(ml) == 12 else sym.EAN13
    quiet = not quiet_votes or sum(quiet_votes) * 2 > len(quiet_votes)
    own = float(np.mean([a.score for a, _ in aligned]))
    return PixelReading(text if (other, ml) == (symbology, text) else ml, quiet, own)


def bar_angle(gray: np.ndarray, box: tuple[int, int, int, int]) -> float | None:
    """The direction across the bars (degrees, -90..90) inside ``box`` of ``gray``: the
    dominant gradient orientation (structure tensor), None without a dominant one."""
    x0, y0, x1, y1 = box
    region = gray[y0:y1, x0:x1]
    if region.shape[0] < 3 or region.shape[1] < 3:
        return None
    if max(region.shape) > 400:
        f = 400 / max(region.shape)
        region = cv2.resize(region, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    gx = cv2.Sobel(region, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(region, cv2.CV_32F, 0, 1, ksize=3)
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    total = jxx + jyy
    if total <= 0 or np.hypot(jxx - jyy, 2 * jxy) / total < 0.3:
        return None
    return 0.5 * float(np.degrees(np.arctan2(2 * jxy, jxx - jyy)))


def upright_crop(gray: np.ndarray, quads: list[np.ndarray], margin: float = 0.3, band: float = 0.25
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """A crop of the frame around ``quads`` (4x2 point arrays, reading direction first) with
    the reading direction turned horizontal, and the 2x3 affine frame -> crop.

    The direction is measured in the image (across the bars, where the decoders put them):
    zbar reports boxes, not directions; the quads' mean direction is the fallback. The crop
    keeps ``margin`` of the symbol length on every side (quiet zones, and context for the
    decoders' binarisers), and at least a band of ``band`` of the length across it (a
    decoder may report one scan line only). A symbol within 3 degrees of level (or of
    vertical) is cut out as it is: resampling would blur it by up to half a pixel.
    """
    if not quads:
        return None
    pts = np.concatenate([q.reshape(-1, 2) for q in quads]).astype(np.float32)
    fh, fw = gray.shape[:2]
    bx0, by0 = np.floor(pts.min(axis=0)).astype(int)
    bx1, by1 = np.ceil(pts.max(axis=0)).astype(int)
    measured = bar_angle(gray, (max(0, bx0), max(0, by0), min(fw, bx1 + 1), min(fh, by1 + 1)))
    if measured is not None:
        angle = measured
    else:
        d = np.sum([q[1] - q[0] for q in quads], axis=0).astype(np.float64)
        if not np.isfinite(d).all() or np.hypot(*d) < 1e-6:
            d = np.array([1.0, 0.0])
        angle = float(np.degrees(np.arctan2(d[1], d[0])))
    angle = ((angle + 90.0) % 180.0) - 90.0  # reading sense does not matter: both are tried
    if abs(abs(angle) - 90.0) < 3.0:
        angle = 90.0 if angle > 0 else -90.0
    elif abs(angle) < 3.0:
        angle = 0.0
    centre = pts.mean(axis=0)
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, 1.0)
    turned = cv2.transform(pts.reshape(-1, 1, 2), m).reshape(-1, 2)
    x_lo, y_lo = turned.min(axis=0)
    x_hi, y_hi = turned.max(axis=0)
    length = max(float(x_hi - x_lo), 8.0)
    pad = margin * length + 4.0
    half_band = max(float(y_hi - y_lo) / 2.0, band * length) + pad / 2.0
    cx, cy = float(x_lo + x_hi) / 2.0, float(y_lo + y_hi) / 2.0
    w = int(np.ceil(float(x_hi - x_lo) + 2 * pad))
    h = int(np.ceil(2 * half_band))
    if w < 8 or w * h > 4_000_000:
        return None
    m[0, 2] = round(m[0, 2] + w / 2.0 - cx)
    m[1, 2] = round(m[1, 2] + h / 2.0 - cy)
    if angle == 0.0:  # a plain cut: no resampling
        x0, y0 = int(-m[0, 2]), int(-m[1, 2])
        xa, ya, xb, yb = max(0, x0), max(0, y0), min(fw, x0 + w), min(fh, y0 + h)
        if xb - xa < 8 or yb - ya < 1:
            return None
        m[0, 2], m[1, 2] = -xa, -ya
        return np.ascontiguousarray(gray[ya:yb, xa:xb]), m
    crop = cv2.warpAffine(gray, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return crop, m
