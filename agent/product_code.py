"""Which decoded barcodes are product codes, and their GTIN-14 (spec/serial.md "Camera").

A product code is a GTIN read from an EAN/UPC symbol, from a GS1 element string carrying
AI (01) (GS1-128 or a QR code), or from a GS1 Digital Link URL; anything else -- a plain
Code 128, a URL without ``/01/`` -- is not (None). Pure: no I/O, no decoder imports, so the
daemon, ``cabinetctl restock --code`` and ``cabinet-agent decode`` agree on every text.

Accepted GS1 element string forms (as zxing-cpp and zbar deliver them):

* bracketed human-readable ``(01)09506000134352(17)251231`` (AI 01 anywhere);
* raw with a symbology identifier ``]C1`` / ``]Q3`` / ``]e0`` / ``]d2`` or a leading FNC1
  (GS, 0x1D) followed by ``01`` + 14 digits;
* raw without any marker (zbar drops the FNC1): ``01`` + 14 digits at the start, followed by
  the end, a GS separator or the next AI's digits.

Digital Link: ``http(s)://host/[any/prefix/]01/<8|12|13|14 digits>[/...][?...]`` (the
``gtin`` synonym of older drafts too); the GTIN is padded to 14 digits.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from agent.gtin import BAD_CHECK_DIGIT, InvalidGtin, normalize

_RETAIL = {"EAN13", "EAN8", "UPCA", "UPCE"}
_GS1_IDENTIFIERS = ("]C1", "]Q3", "]e0", "]d2", "]J1")
_GS = "\x1d"
_BRACKETED = re.compile(r"^(?:\(\d{2,4}\)[^()]*)+$")
_BRACKETED_01 = re.compile(r"\(01\)([^()]*)")
_RAW_01 = re.compile(r"^01(\d{14})(?=$|\x1d|\d)")
_MARKED_01 = re.compile(r"^01([^\x1d]*)")
_DL_KEYS = ("01", "gtin")


def _sym_key(symbology: str) -> str:
    return symbology.upper().replace("-", "").replace("_", "").replace(" ", "")


def _gs1_gtin_field(text: str) -> str | None:
    """The raw AI (01) value of a GS1 element string, None if ``text`` is not one."""
    marked = False
    if text[:3] in _GS1_IDENTIFIERS:
        text, marked = text[3:], True
    if text.startswith(_GS):
        text, marked = text[1:], True
    if text.startswith("(") and _BRACKETED.match(text):
        m = _BRACKETED_01.search(text)
        return m.group(1) if m else None
    m = _RAW_01.match(text)
    if m:
        return m.group(1)
    if marked:
        # Declared GS1 and starts with AI 01, but not 14 digits: hand it on as malformed.
        m = _MARKED_01.match(text)
        return m.group(1)[:14] if m else None
    return None


def _digital_link_gtin(text: str) -> str | None:
    """The GTIN path segment of a GS1 Digital Link URL, None if ``text`` is not one."""
    if not text[:8].lower().startswith(("http://", "https://")):
        return None
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        return None
    if not parts.netloc:
        return None
    segments = parts.path.split("/")
    for i, seg in enumerate(segments[:-1]):
        value = segments[i + 1]
        if seg.lower() in _DL_KEYS and value.isdigit() and value.isascii():
            if len(value) in (8, 12, 13, 14):
                return value
    return None


def classify(text: str, symbology: str) -> tuple[str | None, str | None]:
    """(GTIN-14, None) for a valid product code; (None, "bad_check_digit") for something
    that is a product code by form but whose check digit is wrong; (None, None) otherwise.
    """
    if not isinstance(text, str) or not text:
        return None, None
    sym = _sym_key(symbology)
    if sym in _RETAIL:
        candidate: str | None = text
    else:
        candidate = _gs1_gtin_field(text)
        if candidate is None:
            candidate = _digital_link_gtin(text)
        if candidate is None:
            return None, None
        if len(candidate) != 14 and not text[:4].lower().startswith("http"):
            return None, None  # AI (01) is always 14 digits; only a Digital Link may be shorter
        sym = ""  # the AI / URL value is a plain GTIN, never a UPC-E
    try:
        return normalize(candidate, sym or None), None
    except InvalidGtin as exc:
        return None, (BAD_CHECK_DIGIT if exc.reason == BAD_CHECK_DIGIT else None)


def product_gtin(text: str, symbology: str) -> str | None:
    """GTIN-14 of a decoded symbol if it is a valid product code, else None."""
    return classify(text, symbology)[0]
