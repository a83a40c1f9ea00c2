"""The symbology names the cabinet prints and reports (spec/serial.md "Camera"), and the
mapping from each decoder library's own names to them.

Retail codes are canonicalised so both decoders report the same symbol the same way:

* UPC-A is the EAN-13 bar pattern with a leading 0 -- the bars are identical, no decoder can
  tell them apart from the image. zbar (unless UPC-A is enabled) and zxing-cpp 3 (always)
  report it as a 13-digit EAN-13; we report every EAN-13 whose first digit is 0 as
  ``UPC-A`` with its 12-digit text. This is exact, not a heuristic.
* UPC-E is reported with its 8-digit text (number system, 6 digits, check digit); zxing-cpp
  3 hands out the expanded 13-digit form, which is compressed back losslessly.
"""

from __future__ import annotations

from drivers.gs1 import InvalidGtin, expand_upce

EAN13 = "EAN-13"
EAN8 = "EAN-8"
UPCA = "UPC-A"
UPCE = "UPC-E"
CODE128 = "Code 128"
QR = "QR"

ALL: tuple[str, ...] = (EAN13, EAN8, UPCA, UPCE, CODE128, QR)
RETAIL: frozenset[str] = frozenset({EAN13, EAN8, UPCA, UPCE})

_PYZBAR = {"EAN13": EAN13, "EAN8": EAN8, "UPCA": UPCA, "UPCE": UPCE, "CODE128": CODE128, "QRCODE": QR}
# zxing-cpp 2.x/3.x str(BarcodeFormat) and BarcodeFormat.name spellings.
_ZXING = {
    "EAN-13": EAN13, "EAN13": EAN13,
    "EAN-8": EAN8, "EAN8": EAN8,
    "UPC-A": UPCA, "UPCA": UPCA,
    "UPC-E": UPCE, "UPCE": UPCE,
    "Code 128": CODE128, "Code128": CODE128,
    "QR Code": QR, "QRCode": QR,
}


def from_pyzbar(name: str) -> str | None:
    """Our name for a pyzbar ``Decoded.type`` (e.g. ``QRCODE``), None if not one of ours."""
    return _PYZBAR.get(name)


def from_zxing(fmt: object) -> str | None:
    """Our name for a zxing-cpp ``BarcodeFormat`` (or its str), None if not one of ours."""
    name = getattr(fmt, "name", None)
    if name in _ZXING:
        return _ZXING[name]
    return _ZXING.get(str(fmt))


def compress_upca(upca: str) -> str | None:
    """The 8-digit UPC-E whose expansion is the 12-digit ``upca``, None if it has none."""
    if len(upca) != 12 or not upca.isdigit() or upca[0] not in "01":
        return None
    ns, m, p, check = upca[0], upca[1:6], upca[6:11], upca[11]
    candidates = (
        m[0:2] + p[2:5] + m[2],  # manufacturer ends x00 (x in 0-2), product 00nnn
        m[0:3] + p[3:5] + "3",
        m[0:4] + p[4] + "4",
        m[0:5] + p[4],
    )
    for six in candidates:
        cand = ns + six + check
        try:
            if expand_upce(cand) == upca:
                return cand
        except InvalidGtin:
            continue
    return None


def canonical(symbology: str, text: str, upce_text: str | None = None) -> tuple[str, str]:
    """(symbology, text) in the form we report; ``upce_text`` is a decoder's own 8-digit form."""
    if symbology == EAN13 and len(text) == 13 and text.startswith("0") and text.isdigit():
        return UPCA, text[1:]
    if symbology == UPCA and len(text) == 13 and text.startswith("0"):
        return UPCA, text[1:]
    if symbology == UPCE and len(text) != 8:
        if upce_text and len(upce_text) == 8:
            return UPCE, upce_text
        twelve = text[1:] if len(text) == 13 and text.startswith("0") else text
        short = compress_upca(twelve)
        if short is not None:
            return UPCE, short
    return symbology, text
