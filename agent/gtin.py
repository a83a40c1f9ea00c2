"""GTIN normalisation (mqtt.md, Catalog documents): every product code becomes a 14-digit GTIN.

EAN-13, UPC-A, EAN-8 and GTIN-14 are left-padded to 14 digits; UPC-E is expanded to UPC-A
first. A code whose check digit is wrong is invalid (GtinError with ``bad_check_digit``).
"""

from __future__ import annotations

from agent.errors import GtinError

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
