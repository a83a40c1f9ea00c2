"""Labelled real photos (``../shared/realphotos/``): load them and score a decoder on them.

The folder layout and the scoring follow its README and ``baseline.py``, so the numbers
compare with the baseline table: a folder per group, ``NAME.ext`` with its exact expected
text in ``NAME.txt``; ``NAME-1.ext``, ``NAME-2.ext``... sharing ``NAME.txt`` are one
structured-append item; a group without any ``.txt`` has no expected text
(``falsepositives-*``: every text read there is a misread). An image is read correctly when
its expected text is among the codes read from it -- for EAN/UPC compared as GTINs (UPC-A
photos expect 13 digits, UPC-E the GTIN-13 of its expansion); every other code read from it
is a misread. ``ean13-extension-*`` expects the 13 EAN-13 digits only (add-ons are no GTIN).

Used by scripts/bench_decode.py and the tests; nothing here is tuned on the photos.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from drivers.camera import symbology as sym
from drivers.camera.arbiter import Decoded

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".pgm")
ENV_VAR = "CABINET_REALPHOTOS"

FAMILIES = (("upca", sym.UPCA), ("upce", sym.UPCE), ("ean8", sym.EAN8), ("ean13", sym.EAN13), ("qrcode", sym.QR),
            ("code128", sym.CODE128), ("multi", "multi"), ("falsepositives", "no code"))


def default_root() -> Path | None:
    """``$CABINET_REALPHOTOS`` if set, else ``<repository>/../shared/realphotos``; None if absent."""
    env = os.environ.get(ENV_VAR)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "realphotos"
    return path.resolve() if path.is_dir() else None


def natural(s: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def family(group: str) -> str:
    """The symbology family a group tests (``upca-4`` -> ``UPC-A``)."""
    for prefix, name in FAMILIES:
        if group.startswith(prefix):
            return name
    return "other"


@dataclass
class Item:
    """One thing to read: one image, or the images of one structured-append message."""

    kind: str  # "single", "sequence" or "none" (no expected text)
    images: list[str]
    expected: str | None


@dataclass
class Group:
    name: str
    path: Path
    items: list[Item]
    unreadable: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        return family(self.name)


def load(root: Path) -> list[Group]:
    """Every group folder of ``root`` (hidden and ``_`` folders skipped), in natural order."""
    groups = []
    for name in sorted((g for g in os.listdir(root) if (root / g).is_dir() and not g.startswith((".", "_"))),
                       key=natural):
        groups.append(_load_group(root / name, name))
    return groups


def _load_group(path: Path, name: str) -> Group:
    files = sorted(os.listdir(path), key=natural)
    texts = {f[:-4]: (path / f).read_bytes().decode("utf-8", "replace")
             for f in files if f.endswith(".txt") and not f.endswith(".result.txt")}
    items: list[Item] = []
    sequences: dict[str, list[str]] = {}
    for f in files:
        if os.path.splitext(f)[1].lower() not in IMAGE_EXTS:
            continue
        base = os.path.splitext(f)[0]
        seq = re.match(r"(.+)-\d+$", base)
        if base in texts:
            exp = texts[base][:13] if "extension" in name else texts[base]
            items.append(Item("single", [f], exp))
        elif seq and seq.group(1) in texts:
            sequences.setdefault(seq.group(1), []).append(f)
        else:
            items.append(Item("none", [f], None))
    items += [Item("sequence", fs, texts[k]) for k, fs in sequences.items()]
    return Group(name, path, items)


def read_gray(path: Path) -> np.ndarray | None:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return img if img is not None and img.size else None


def matches(code: Decoded, expected: str) -> bool:
    """``code`` is the expected one: the same text, or for EAN/UPC the same GTIN."""
    if code.text == expected:
        return True
    return (code.symbology in sym.RETAIL and code.gtin is not None and expected.isdigit()
            and len(expected) in (8, 12, 13, 14) and expected.zfill(14) == code.gtin)


@dataclass
class Score:
    """Items read correctly and misreads (codes read that are not the expected one)."""

    items: int = 0
    ok: int = 0
    misreads: int = 0
    images_with_reads: int = 0  # groups without expected texts
    texts: int = 0
    wrong: list[str] = field(default_factory=list)  # "image: text" of every misread

    def add(self, other: Score) -> None:
        self.items += other.items
        self.ok += other.ok
        self.misreads += other.misreads
        self.images_with_reads += other.images_with_reads
        self.texts += other.texts
        self.wrong += other.wrong


Reader = Callable[[np.ndarray], list[Decoded]]


def score_group(group: Group, read: Reader, cache: dict[str, list[Decoded]] | None = None) -> Score:
    """Score one reader on one group (each image read once; ``cache`` keeps the reads)."""
    got: dict[str, list[Decoded]] = {} if cache is None else cache
    for item in group.items:
        for f in item.images:
            if f not in got:
                img = read_gray(group.path / f)
                if img is None:
                    group.unreadable.append(f)
                    got[f] = []
                else:
                    got[f] = read(img)
    s = Score()
    for item in group.items:
        reads = [got[f] for f in item.images]
        if item.kind == "none":
            codes = reads[0]
            s.images_with_reads += bool(codes)
            s.texts += len({c.text for c in codes})
            if group.family == "no code":
                s.misreads += len({c.text for c in codes})
                s.wrong += [f"{item.images[0]}: {c.text!r}" for c in codes]
            continue
        assert item.expected is not None
        s.items += 1
        if item.kind == "single":
            codes = reads[0]
            s.ok += any(matches(c, item.expected) for c in codes)
            bad = {c.text for c in codes if not matches(c, item.expected)}
        else:  # every image one part, joined in name order
            joined = "".join(r[0].text if len(r) == 1 else "\0" for r in reads)
            s.ok += joined == item.expected
            bad = {c.text for r in reads for c in r if c.text not in item.expected}
        s.misreads += len(bad)
        s.wrong += [f"{item.images[0]}: {t!r}" for t in sorted(bad)]
    return s


def by_family(groups: Iterable[Group], scores: dict[str, Score]) -> dict[str, Score]:
    out: dict[str, Score] = {}
    for g in groups:
        out.setdefault(g.family, Score()).add(scores[g.name])
    return out


# -- the libraries alone, as baseline.py runs them (defaults, every symbology) --------------------

def _pyzbar_alone() -> Reader | None:
    try:
        from pyzbar import pyzbar
    except Exception:  # noqa: BLE001 - not installed / no libzbar
        return None

    def read(gray: np.ndarray) -> list[Decoded]:
        try:
            found = pyzbar.decode(gray)
        except Exception:  # noqa: BLE001 - pyzbar 0.1.9 raises on an unknown orientation
            return []
        out = []
        for d in found:
            text = d.data.decode("utf-8", "replace")
            out.append(Decoded(str(d.type), text, None))
        return out

    return read


def _zxing_alone() -> Reader | None:
    try:
        import zxingcpp
    except Exception:  # noqa: BLE001
        return None

    def read(gray: np.ndarray) -> list[Decoded]:
        # compared by text, exactly as baseline.py does: no GTIN
        return [Decoded(str(r.format), r.text, None)
                for r in zxingcpp.read_barcodes(gray, text_mode=zxingcpp.TextMode.Plain)]

    return read


def library_readers() -> dict[str, Reader]:
    """``pyzbar`` and ``zxing-cpp`` alone (those installed), as in the baseline."""
    out = {}
    for name, make in (("pyzbar", _pyzbar_alone), ("zxing-cpp", _zxing_alone)):
        reader = make()
        if reader is not None:
            out[name] = reader
    return out


def score_union(group: Group, caches: list[dict[str, list[Decoded]]]) -> Score:
    """The naive union: every library's texts of an image together."""
    merged: dict[str, list[Decoded]] = {}
    for cache in caches:
        for f, codes in cache.items():
            seen = {c.text for c in merged.get(f, [])}
            merged.setdefault(f, []).extend(c for c in codes if c.text not in seen)
    return score_group(group, lambda img: [], merged)
