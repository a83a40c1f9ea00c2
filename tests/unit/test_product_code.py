"""Which decoded texts are product codes, and their GTIN-14 (GS1 forms, Digital Link, UPC-E)."""

from __future__ import annotations

import pytest

from drivers.gs1 import classify, product_gtin

BAD = "bad_check_digit"

# (text, symbology, expected gtin, expected reason)
TABLE = [
    # EAN / UPC
    ("5901234123457", "EAN-13", "05901234123457", None),
    ("5901234123458", "EAN-13", None, BAD),
    ("96385074", "EAN-8", "00000096385074", None),
    ("96385075", "EAN-8", None, BAD),
    ("036000291452", "UPC-A", "00036000291452", None),
    ("036000291453", "UPC-A", None, BAD),
    ("01234565", "UPC-E", "00012345000065", None),  # expands to 012345000065
    ("01234564", "UPC-E", None, BAD),
    ("04252614", "UPC-E", "00042100005264", None),  # last digit 0-2 rule: 042100005264
    ("01234434", "UPC-E", "00012300000444", None),  # last digit 3 rule: 012300000444
    ("21234565", "UPC-E", None, None),  # number system 2 is not UPC-E: malformed
    ("590123412345", "EAN-13", None, BAD),  # 12 digits read as EAN-13: UPC-A-length, wrong check
    ("59012341234", "EAN-13", None, None),  # 11 digits: malformed, not a bad check digit
    ("ABCDEFGHIJKLM", "EAN-13", None, None),
    # GS1 element strings: bracketed
    ("(01)09506000134352", "Code 128", "09506000134352", None),
    ("(01)09506000134352(17)251231(10)ABC", "QR", "09506000134352", None),
    ("(17)251231(01)09506000134352", "QR", "09506000134352", None),
    ("(01)09506000134353", "QR", None, BAD),
    ("(01)0950600013435", "QR", None, None),  # 13 digits in AI 01: malformed
    ("(10)ABC(17)251231", "Code 128", None, None),  # GS1 without AI 01: no product
    # raw forms as zbar / zxing deliver them
    ("0109506000134352", "Code 128", "09506000134352", None),
    ("0109506000134352\x1d10ABC", "Code 128", "09506000134352", None),
    ("010950600013435217251231", "Code 128", "09506000134352", None),
    ("]C10109506000134352", "Code 128", "09506000134352", None),
    ("]Q30109506000134352\x1d10ABC", "QR", "09506000134352", None),
    ("\x1d0109506000134352", "Code 128", "09506000134352", None),
    ("]C10109506000134353", "Code 128", None, BAD),
    ("]C1010950600013", "Code 128", None, None),  # declared GS1, AI 01 too short
    ("0109506000134352ABC", "Code 128", None, None),  # not followed by an AI: not GS1
    ("LOT-1234-ABC", "Code 128", None, None),
    # GS1 Digital Link
    ("https://id.gs1.org/01/09506000134352", "QR", "09506000134352", None),
    ("https://example.com/01/09506000134352/10/ABC/21/12345?17=251231", "QR", "09506000134352", None),
    ("https://shop.example.org/products/en/01/09506000134352?linkType=gs1:pip", "QR", "09506000134352", None),
    ("http://example.com/gtin/9506000134352", "QR", "09506000134352", None),
    ("HTTPS://ID.GS1.ORG/01/09506000134352", "QR", "09506000134352", None),
    ("https://id.gs1.org/01/96385074", "QR", "00000096385074", None),  # GTIN-8 in a link
    ("https://id.gs1.org/01/09506000134353", "QR", None, BAD),
    ("https://id.gs1.org/01/0950600013", "QR", None, None),  # 10 digits: not a GTIN
    ("https://example.com/shop/item/42", "QR", None, None),
    ("https://example.com/?01=09506000134352", "QR", None, None),  # query is not the path
    ("ftp://example.com/01/09506000134352", "QR", None, None),
    # plain texts are not product codes, even all digits
    ("5901234123457", "QR", None, None),
    ("hello world", "QR", None, None),
    ("", "QR", None, None),
]


@pytest.mark.parametrize(("text", "symbology", "gtin", "reason"), TABLE)
def test_classify_table(text: str, symbology: str, gtin: str | None, reason: str | None) -> None:
    assert classify(text, symbology) == (gtin, reason)
    assert product_gtin(text, symbology) == gtin


@pytest.mark.parametrize("spelling", ["EAN-13", "EAN13", "ean_13", "ean 13"])
def test_symbology_spelling_is_tolerant(spelling: str) -> None:
    assert product_gtin("5901234123457", spelling) == "05901234123457"


def test_upce_needs_the_upce_symbology_to_expand() -> None:
    # The same 8 digits: as EAN-8 they are a (here invalid) EAN-8, as UPC-E a valid UPC-E.
    assert classify("04252614", "UPC-E") == ("00042100005264", None)
    assert classify("04252614", "EAN-8") == (None, BAD)
