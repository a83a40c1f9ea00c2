"""Arbitration: from every read of every view, the codes we are sure of. Never a guess.

A misread is worse than a missed code here (a wrong GTIN becomes an ``uncertified_scan``
held against an honest operator, or a wrong product restocked), so a code is reported only
when independent evidence agrees. Reads are grouped by place in the frame (a symbol is one
place); each place is judged on its own. Each rule was measured on the real photos
(scripts/bench_decode.py switches them off one at a time; the README has the table):

1. **Check digits.** An EAN/UPC text whose check digit is wrong is no read at all.
2. **Partial reads.** At a place holding an EAN-13/UPC-A or Code 128 read, an EAN-8 or UPC-E
   read is a piece of the longer symbol and is dropped; so is a linear read inside a QR code.
3. **Agreement (linear codes).** One check character protects a linear symbol, so one read
   is not enough: two independent views must give the same text -- the two decoders, or
   zxing-cpp at two scales. zbar at two scales is *not* independent: on real photos it
   repeats its own misreads at every scale (zxing-cpp's binariser sees a rescaled image
   differently; zbar's edge detector hardly does). Only without zxing-cpp (degraded mode,
   alarmed) do two zbar scales count.
   3b. **The pixels as a second view.** An EAN/UPC text read by one view counts twice when
   the module centres, read a third way (``bars.read_pixels``: the best valid text under
   the check digit on the decoded text's own alignment), give exactly the same text and
   the quiet zones beside its guards are free of bars.
4. **Contests.** When views read different linear texts at one place, votes do not settle
   it (both decoders can repeat one misread). The pixel check decides: the text whose bar
   pattern explains the pixels best by ``pixel_margin`` wins (its views and the pixel check
   are its two pieces of evidence); otherwise every text of the place is dropped. Code 128
   has no pixel check: a contested Code 128 place is dropped.
5. **Pixel veto.** Fewer than three views agreeing on an EAN/UPC text may still share a
   misread (both libraries read one blurred UPC-A photo as the same wrong EAN-13): when the
   symbol is well imaged (its pattern correlates >= ``trusted_fit`` with the pixels) and its
   module centres read another valid text, the text is dropped.
6. **QR codes** carry Reed-Solomon error correction: one read is enough. zbar's QR text is
   dropped when zbar had to guess its character set (non-ASCII: it turns Shift-JIS into
   other CJK text); zxing-cpp follows ECI and the standard's defaults. A QR code whose area
   holds another one is partly covered by it (a code printed over a code): the covered one
   is dropped, the one on top is read. Two different QR texts at one place: both dropped.

Pure: reads and a pixel-judge callable in, ``Decoded`` out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from drivers.camera import symbology as sym
from drivers.camera.backends import ZBAR, ZXING, Read
from drivers.camera.bars import PixelReading
from drivers.gs1 import classify

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
Key = tuple[str, str]  # (symbology, text)
# judge(place reads, candidate keys) -> the pixel reading per key (keys it cannot judge omitted)
Judge = Callable[[list[Read], list[Key]], dict[Key, PixelReading]]

TRUSTED_VIEWS = 3  # this many independent views agreeing need no pixel check
_LONG_LINEAR = frozenset({sym.EAN13, sym.UPCA, sym.CODE128})
_SHORT_RETAIL = frozenset({sym.EAN8, sym.UPCE})


@dataclass(frozen=True)
class Decoded:
    """One code read from an image, in the names of spec/serial.md."""

    symbology: str
    text: str
    gtin: str | None


@dataclass(frozen=True)
class Rules:
    """Which rules apply (all, by default; the benchmark switches them off one at a time)."""

    partial_reads: bool = True
    agreement: bool = True
    zbar_scales_agree: bool = False  # rule 3's exception; the pipeline sets it without zxing-cpp
    pixel_check: bool = True  # rule 4: contested EAN/UPC places settled by the pixel check
    pixel_confirm: bool = True  # rule 3b: the pixel reading counts as a second piece of evidence
    quiet_zones: bool = True  # rule 3b: ...only with light quiet zones beside the guards
    pixel_veto: bool = True  # rule 5: a clean pixel reading of another text vetoes
    zbar_pixels: bool = True  # rule 3b also for texts zbar alone read
    pixel_margin: float = 0.02
    trusted_fit: float = 0.85
    qr_charset: bool = True
    qr_nesting: bool = True


@dataclass
class Verdict:
    """What arbitration decided, with the reasons (for logs, the benchmark and tests)."""

    codes: list[Decoded] = field(default_factory=list)
    dropped: list[tuple[Key, str]] = field(default_factory=list)


def is_linear(symbology: str) -> bool:
    return symbology != sym.QR


def _box(r: Read) -> Box:
    """The read's box; a linear read that is one scan line gets the symbol's likely height."""
    x0, y0, x1, y1 = r.box
    if not is_linear(r.symbology):
        return x0, y0, x1, y1
    (ax, ay), (bx, by) = r.quad[0], r.quad[1]
    length = ((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5
    if length <= 0:
        return x0, y0, x1, y1
    nx, ny = -(by - ay) / length, (bx - ax) / length  # across the bars
    reach = 0.15 * length
    return (min(x0, x0 - abs(nx) * reach), min(y0, y0 - abs(ny) * reach),
            max(x1, x1 + abs(nx) * reach), max(y1, y1 + abs(ny) * reach))


def _area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _intersection(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _same_place(a: Box, b: Box, linear: bool) -> bool:
    if linear:  # scan lines of one symbol: any overlap
        pad = 2.0
        return a[0] - pad <= b[2] and b[0] - pad <= a[2] and a[1] - pad <= b[3] and b[1] - pad <= a[3]
    small = min(_area(a), _area(b))
    return small > 0 and _intersection(a, b) >= 0.25 * small


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def places(reads: list[Read]) -> list[list[Read]]:
    """Reads grouped by place: linear and QR reads separately, overlapping ones together."""
    out: list[list[Read]] = []
    for linear in (True, False):
        group = [r for r in reads if is_linear(r.symbology) == linear]
        boxes = [_box(r) for r in group]
        parent = list(range(len(group)))
        for i in range(len(group)):
            for j in range(i):
                if _same_place(boxes[i], boxes[j], linear):
                    parent[_root(parent, i)] = _root(parent, j)
        clusters: dict[int, list[Read]] = {}
        for i, r in enumerate(group):
            clusters.setdefault(_root(parent, i), []).append(r)
        out.extend(clusters.values())
    return out


def union_box(reads: list[Read]) -> Box:
    boxes = [_box(r) for r in reads]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def _views(reads: list[Read]) -> dict[Key, set[tuple[str, float]]]:
    out: dict[Key, set[tuple[str, float]]] = {}
    for r in reads:
        out.setdefault((r.symbology, r.text), set()).add(r.view)
    return out


def evidence(views: set[tuple[str, float]], rules: Rules) -> int:
    """Rule 3: independent views among ``views`` (zbar's scales count once unless allowed)."""
    if not rules.agreement:
        return 2 if views else 0
    if rules.zbar_scales_agree:
        return len(views)
    return len({v for v in views if v[0] != ZBAR}) + (1 if any(v[0] == ZBAR for v in views) else 0)


class Arbiter:
    """Applies ``Rules`` to the reads of one frame."""

    def __init__(self, rules: Rules | None = None) -> None:
        self.rules = rules or Rules()

    def decide(self, reads: list[Read], judge: Judge | None = None) -> Verdict:
        verdict = Verdict()
        valid = [r for r in reads if self._valid(r, verdict)]
        accepted: list[tuple[Box, Decoded]] = []
        qr_boxes: list[Box] = []
        groups = places(valid)
        for place in (g for g in groups if not is_linear(g[0].symbology)):
            for key, box in self._qr_place(place, verdict):
                accepted.append((box, self._decoded(key)))
                qr_boxes.append(box)
        for place in (g for g in groups if is_linear(g[0].symbology)):
            box = union_box(place)
            if self.rules.partial_reads and any(_intersection(box, q) >= 0.5 * _area(box) for q in qr_boxes):
                for key in _views(place):
                    verdict.dropped.append((key, "linear read inside a QR code"))
                continue
            won = self._linear_place(place, judge, verdict)
            if won is not None:
                accepted.append((box, self._decoded(won)))
        accepted.sort(key=lambda a: (a[0][1], a[0][0]))
        seen: set[Key] = set()
        for _, d in accepted:
            if (d.symbology, d.text) not in seen:
                seen.add((d.symbology, d.text))
                verdict.codes.append(d)
        for key, why in verdict.dropped:
            log.debug("dropped %s %r: %s", key[0], key[1], why)
        return verdict

    # -- rules ------------------------------------------------------------------------------------

    @staticmethod
    def _valid(r: Read, verdict: Verdict) -> bool:
        """Rule 1: a retail text with a bad check digit (or malformed) is no read."""
        if r.symbology in sym.RETAIL and classify(r.text, r.symbology)[0] is None:
            verdict.dropped.append(((r.symbology, r.text), f"invalid {r.symbology} from {r.backend}"))
            return False
        return True

    @staticmethod
    def _decoded(key: Key) -> Decoded:
        return Decoded(key[0], key[1], classify(key[1], key[0])[0])

    def _qr_place(self, place: list[Read], verdict: Verdict) -> list[tuple[Key, Box]]:
        rules = self.rules
        reads = place
        if rules.qr_charset:
            guessed = [r for r in reads if r.charset_guess]
            for r in guessed:
                verdict.dropped.append(((r.symbology, r.text), "zbar guessed the QR character set"))
            reads = [r for r in reads if not r.charset_guess]
        by_key: dict[Key, list[Read]] = {}
        for r in reads:
            by_key.setdefault((r.symbology, r.text), []).append(r)
        boxes = {k: union_box(rs) for k, rs in by_key.items()}
        if rules.qr_nesting and len(boxes) > 1:
            covered = {k for k, b in boxes.items()
                       if any(o != k and _intersection(b, ob) >= 0.9 * _area(ob) and _area(ob) < 0.7 * _area(b)
                              for o, ob in boxes.items())}
            for k in covered:
                verdict.dropped.append((k, "QR code covered by another one"))
            boxes = {k: b for k, b in boxes.items() if k not in covered}
        if len(boxes) > 1:
            for k in boxes:
                verdict.dropped.append((k, "different QR texts at one place"))
            return []
        return list(boxes.items())

    def _linear_place(self, place: list[Read], judge: Judge | None, verdict: Verdict) -> Key | None:
        rules = self.rules
        reads = place
        if rules.partial_reads and any(r.symbology in _LONG_LINEAR for r in reads):
            for r in reads:
                if r.symbology in _SHORT_RETAIL:
                    verdict.dropped.append(((r.symbology, r.text), "part of a longer symbol"))
            reads = [r for r in reads if r.symbology not in _SHORT_RETAIL]
        views = _views(reads)
        keys = sorted(views)
        if len(keys) > 1:
            return self._contest(reads, views, judge, verdict)
        key = keys[0]
        count = evidence(views[key], rules)
        if key[0] in sym.RETAIL and count < TRUSTED_VIEWS and judge is not None and (
                rules.pixel_confirm or rules.pixel_veto):
            reading = judge(reads, [key]).get(key)
            veto = self._vetoed(key, reading)
            if veto is not None:
                verdict.dropped.append((key, veto))
                return None
            by_zxing = any(v[0] == ZXING for v in views[key])
            if (rules.pixel_confirm and reading is not None and reading.text == key[1]
                    and (reading.quiet or not rules.quiet_zones) and (rules.zbar_pixels or by_zxing)):
                count += 1  # the module centres, read a third way, give the same text
        if count >= 2:
            return key
        verdict.dropped.append((key, f"one piece of evidence only ({_describe(views[key])})"))
        return None

    def _vetoed(self, key: Key, reading: PixelReading | None) -> str | None:
        """Rule 5: on a well imaged symbol the module centres read another valid text."""
        if (not self.rules.pixel_veto or reading is None or reading.text is None or reading.text == key[1]
                or reading.fit < self.rules.trusted_fit):
            return None
        return f"the pixels read {reading.text} (fit {reading.fit:.3f})"

    def _contest(self, reads: list[Read], views: dict[Key, set[tuple[str, float]]], judge: Judge | None,
                 verdict: Verdict) -> Key | None:
        """Rule 4: different linear texts at one place; the pixels decide, or nobody wins."""
        rules = self.rules
        keys = sorted(views)
        readings: dict[Key, PixelReading] = {}
        if rules.pixel_check and judge is not None and all(k[0] in sym.RETAIL for k in keys):
            readings = judge(reads, keys)
        if len(readings) == len(keys):
            ranked = sorted(keys, key=lambda k: -readings[k].fit)
            best, second = ranked[0], ranked[1]
            margin = readings[best].fit - readings[second].fit
            veto = self._vetoed(best, readings[best])
            if margin >= rules.pixel_margin and veto is None:
                for k in ranked[1:]:
                    verdict.dropped.append((k, f"lost the pixel check to {best[1]} ({readings[k].fit:.3f} < "
                                               f"{readings[best].fit:.3f})"))
                return best  # its views and the pixel check: two pieces of evidence
            why = veto or "pixel check undecided (" + ", ".join(f"{k[1]}={readings[k].fit:.3f}" for k in ranked) + ")"
        else:
            why = "decoders disagree at one place"
        for k in keys:
            verdict.dropped.append((k, why))
        return None


def _describe(views: set[tuple[str, float]]) -> str:
    return ", ".join(f"{b}@{s:g}" for b, s in sorted(views))


__all__ = ["Arbiter", "Decoded", "Judge", "Rules", "Verdict", "evidence", "places", "union_box"]
