"""GS1 product codes: GTIN normalisation and which decoded barcodes carry a GTIN.

GTIN normalisation (mqtt.md, Catalog documents): every product code becomes a 14-digit GTIN.

EAN-13, UPC-A, EAN-8 and GTIN-14 are left-padded to 14 digits; UPC-E is expanded to UPC-A
first. A code whose check digit is wrong is invalid (GtinError with ``bad_check_digit``).

Product codes (spec/serial.md "Camera"): which decoded barcodes carry a GTIN-14.

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

from drivers.errors import GtinError

BAD_CHECK_DIGIT = "bad_check_digit"
MALFORMED = "malformed"


class InvalidGtin(GtinError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_digit(body: str) -> int:
    """GS1 mod-10 check digit of the digits before it (weights 3,1,3,... from the right)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        total += int(ch) * (3 if i % 2 == 0 else 1)
    return (10 - total % 10) % 10


def expand_upce(code: str) -> str:
    """UPC-E (8 digits: number system, 6 data digits, check) to its 12-digit UPC-A form."""
    if len(code) == 6:
        raise InvalidGtin(MALFORMED, "UPC-E needs its number system and check digit (8 digits)")
    if len(code) == 7:
        code = code + "?"
    if len(code) != 8 or not code[:7].isdigit():
        raise InvalidGtin(MALFORMED, f"UPC-E must be 8 digits: {code!r}")
    ns, d, check = code[0], code[1:7], code[7]
    if ns not in "01":
        raise InvalidGtin(MALFORMED, f"UPC-E number system must be 0 or 1: {code!r}")
    last = d[5]
    if last in "012":
        body = ns + d[0:2] + last + "0000" + d[2:5]
    elif last == "3":
        body = ns + d[0:3] + "00000" + d[3:5]
    elif last == "4":
        body = ns + d[0:4] + "00000" + d[4]
    else:
        body = ns + d[0:5] + "0000" + last
    return body + check


def normalize(code: str, symbology: str | None = None) -> str:
    """Return the GTIN-14 of ``code``; raises InvalidGtin (reason bad_check_digit or malformed).

    ``symbology`` (as the camera reports it: EAN13, EAN8, UPCA, UPCE, ...) matters only for
    8-digit codes: read as UPC-E they are expanded first, otherwise 8 digits are EAN-8.
    """
    if not isinstance(code, str):
        raise InvalidGtin(MALFORMED, "a GTIN is a string of digits")
    code = code.strip()
    sym = (symbology or "").upper().replace("-", "").replace("_", "")
    if sym == "UPCE":
        code = expand_upce(code)
    if not code.isdigit() or not code.isascii():
        raise InvalidGtin(MALFORMED, f"not all digits: {code!r}")
    if len(code) not in (8, 12, 13, 14):
        raise InvalidGtin(MALFORMED, f"a GTIN has 8, 12, 13 or 14 digits, not {len(code)}")
    if check_digit(code[:-1]) != int(code[-1]):
        raise InvalidGtin(BAD_CHECK_DIGIT, f"check digit of {code} should be {check_digit(code[:-1])}")
    return code.zfill(14)


def try_normalize(code: str, symbology: str | None = None) -> str | None:
    try:
        return normalize(code, symbology)
    except InvalidGtin:
        return None


def with_check_digit(body: str) -> str:
    """Append the check digit (used by generators and tests)."""
    return body + str(check_digit(body))

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
        candidate = text
    else:
        found = _gs1_gtin_field(text)
        if found is None:
            found = _digital_link_gtin(text)
        if found is None:
            return None, None
        candidate = found
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
