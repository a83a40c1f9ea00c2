"""GTIN normalisation (mqtt.md, Catalog documents) and the wire conventions (mqtt.md, Conventions)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import GtinError, SignatureError
from agent.protocol import (
    canonical,
    epoch_of,
    format_ts,
    load_public_key,
    parse_ts,
    public_key_b64,
    sign,
    ts_from_epoch,
    verify_bytes,
    verify_signed,
)
from drivers.gs1 import (
    BAD_CHECK_DIGIT,
    MALFORMED,
    InvalidGtin,
    check_digit,
    expand_upce,
    normalize,
    try_normalize,
    with_check_digit,
)


def gs1_check(body: str) -> int:
    """GS1 General Specifications 7.9.1, written out: weights 3,1,3,... from the rightmost body digit."""
    weights = [3 if i % 2 == 0 else 1 for i in range(len(body))]
    total = sum(int(d) * w for d, w in zip(reversed(body), weights, strict=True))
    return (10 - total % 10) % 10


# -- check digits --------------------------------------------------------------------------------------------
KNOWN = [
    ("4006381333931", "EAN-13"),
    ("9506000134352", "EAN-13, GS1 example"),
    ("5901234123457", "EAN-13"),
    ("036000291452", "UPC-A"),
    ("042100005264", "UPC-A"),
    ("73513537", "EAN-8"),
    ("96385074", "EAN-8"),
    ("10614141000415", "GTIN-14"),
    ("00012345600012", "GTIN-14"),
]


@pytest.mark.parametrize(("code", "kind"), KNOWN)
def test_check_digit_of_known_gtins(code: str, kind: str) -> None:
    assert check_digit(code[:-1]) == int(code[-1])
    assert with_check_digit(code[:-1]) == code


@pytest.mark.parametrize(
    ("code", "gtin14"),
    [
        ("4006381333931", "04006381333931"),
        ("9506000134352", "09506000134352"),
        ("036000291452", "00036000291452"),
        ("73513537", "00000073513537"),
        ("10614141000415", "10614141000415"),
        ("  4006381333931\n", "04006381333931"),
    ],
)
def test_normalize_pads_to_gtin14(code: str, gtin14: str) -> None:
    assert normalize(code) == gtin14
    assert try_normalize(code) == gtin14


@pytest.mark.parametrize("symbology", ["EAN13", "EAN-13", "ean13", "UPCA", "UPC-A", "EAN8", "CODE128", None])
def test_symbology_does_not_change_non_upce_codes(symbology: str | None) -> None:
    assert normalize("036000291452", symbology) == "00036000291452"
    assert normalize("73513537", symbology) == "00000073513537"


@pytest.mark.parametrize("code", ["4006381333932", "036000291453", "73513536", "10614141000416", "9506000134350"])
def test_bad_check_digit(code: str) -> None:
    with pytest.raises(InvalidGtin) as info:
        normalize(code)
    assert info.value.reason == BAD_CHECK_DIGIT
    assert isinstance(info.value, GtinError)
    assert try_normalize(code) is None


@pytest.mark.parametrize("code", ["", "1234567", "12345678901", "123456789012345", "40063813339A1", "4006381 33931",
                                  "٤٠٠٦٣٨١٣٣٣٩٣١", "-4006381333931"])
def test_malformed(code: str) -> None:
    with pytest.raises(InvalidGtin) as info:
        normalize(code)
    assert info.value.reason == MALFORMED
    assert try_normalize(code) is None


def test_not_a_string_is_malformed() -> None:
    with pytest.raises(InvalidGtin) as info:
        normalize(4006381333931)  # type: ignore[arg-type]
    assert info.value.reason == MALFORMED


@settings(max_examples=200, deadline=None)
@given(body=st.text(alphabet="0123456789", min_size=7, max_size=13).filter(lambda b: len(b) in (7, 11, 12, 13)))
def test_valid_codes_normalize_and_every_other_check_digit_is_bad(body: str) -> None:
    good = body + str(gs1_check(body))
    assert normalize(good) == good.zfill(14)
    for wrong in set("0123456789") - {good[-1]}:
        assert try_normalize(body + wrong) is None


@settings(max_examples=200, deadline=None)
@given(body=st.text(alphabet="0123456789", min_size=1, max_size=17))
def test_check_digit_matches_gs1_formula(body: str) -> None:
    assert check_digit(body) == gs1_check(body)


# -- UPC-E --------------------------------------------------------------------------------------------------
UPCE = [
    ("04252614", "042100005264"),   # Wikipedia "Universal Product Code", UPC-E example
    ("06543217", "065100004327"),
    ("01234565", "012345000065"),   # last digit 5..9: manufacturer 5 digits, 0000, the last digit
    ("01234505", "012000003455"),   # last digit 0: ab0 0000 cde
    ("01234514", "012100003454"),   # last digit 1
    ("01234523", "012200003453"),   # last digit 2
    ("01234133", "012300000413"),   # last digit 3: abc 00000 de
    ("01234145", "012340000015"),   # last digit 4: abcd 00000 e
    ("11234562", "112345000062"),   # number system 1
]


def upce_to_upca(code: str) -> str:
    """GS1 table for UPC-E -> UPC-A, written out independently of drivers.gs1."""
    ns, (d1, d2, d3, d4, d5, d6), check = code[0], code[1:7], code[7]
    if d6 in "012":
        body = f"{ns}{d1}{d2}{d6}0000{d3}{d4}{d5}"
    elif d6 == "3":
        body = f"{ns}{d1}{d2}{d3}00000{d4}{d5}"
    elif d6 == "4":
        body = f"{ns}{d1}{d2}{d3}{d4}00000{d5}"
    else:
        body = f"{ns}{d1}{d2}{d3}{d4}{d5}0000{d6}"
    return body + check


@pytest.mark.parametrize(("upce", "upca"), UPCE)
def test_upce_expansion_table(upce: str, upca: str) -> None:
    assert upce_to_upca(upce) == upca
    assert gs1_check(upca[:-1]) == int(upca[-1])  # every example is a valid UPC-A
    assert expand_upce(upce) == upca
    assert normalize(upce, "UPCE") == "00" + upca
    assert normalize(upce, "UPC-E") == "00" + upca


def test_eight_digits_read_as_ean8_are_not_expanded() -> None:
    assert normalize("73513537", "EAN8") == "00000073513537"
    assert normalize("73513537") == "00000073513537"
    # the same 8 digits read as UPC-E are something else (or invalid)
    assert try_normalize("73513537", "UPCE") is None  # number system 7


@settings(max_examples=300, deadline=None)
@given(ns=st.sampled_from("01"), data=st.text(alphabet="0123456789", min_size=6, max_size=6))
def test_upce_expansion_property(ns: str, data: str) -> None:
    body = upce_to_upca(ns + data + "0")[:-1]
    check = str(gs1_check(body))
    upce = ns + data + check
    assert expand_upce(upce) == body + check
    assert normalize(upce, "UPCE") == ("00" + body + check)
    wrong = str((int(check) + 1) % 10)
    with pytest.raises(InvalidGtin) as info:
        normalize(ns + data + wrong, "UPCE")
    assert info.value.reason == BAD_CHECK_DIGIT


@pytest.mark.parametrize("code", ["123456", "21234565", "91234565", "0123456", "012345", "0123456A", "012345678"])
def test_upce_malformed(code: str) -> None:
    with pytest.raises(InvalidGtin) as info:
        normalize(code, "UPCE")
    assert info.value.reason == MALFORMED


# -- canonical JSON ---------------------------------------------------------------------------------------------
def test_canonical_is_sorted_compact_utf8() -> None:
    obj = {"b": 1, "a": {"d": "é", "c": [1, 2.5, None, True, False]}, "Z": "香菇 €"}
    assert canonical(obj) == (
        '{"Z":"香菇 €","a":{"c":[1,2.5,null,true,false],"d":"é"},"b":1}'.encode()
    )
    assert canonical(obj) == b'{"Z":"\xe9\xa6\x99\xe8\x8f\x87 \xe2\x82\xac","a":{"c":[1,2.5,null,true,false],' \
                             b'"d":"\xc3\xa9"},"b":1}'


def test_canonical_nested_sorting_and_escapes() -> None:
    obj = {"outer": {"z": {"y": 1, "x": 2}, "a": []}, "q": 'quote " and \\ and \n', "emoji": "🙂"}
    assert canonical(obj) == (
        b'{"emoji":"\xf0\x9f\x99\x82","outer":{"a":[],"z":{"x":2,"y":1}},"q":"quote \\" and \\\\ and \\n"}'
    )


def test_canonical_ignores_insertion_order() -> None:
    assert canonical({"a": 1, "b": {"c": 2, "d": 3}}) == canonical({"b": {"d": 3, "c": 2}, "a": 1})


# -- signatures ------------------------------------------------------------------------------------------------
KEY = Ed25519PrivateKey.generate()


def test_sign_verify_round_trip() -> None:
    obj = {"id": "c-1", "type": "status", "args": {"ünï": "香"}, "n": 1.5}
    signed = sign(obj, KEY)
    assert set(signed) == set(obj) | {"sig"}
    assert "sig" not in obj  # the input is not modified
    verify_signed(signed, KEY.public_key())
    # the signature is over the canonical JSON without sig (mqtt.md)
    KEY.public_key().verify(base64.b64decode(signed["sig"]), canonical(obj))
    verify_bytes(canonical(obj), base64.b64decode(signed["sig"]), KEY.public_key())


def test_sign_replaces_an_existing_sig() -> None:
    signed = sign({"a": 1, "sig": "old"}, KEY)
    assert signed["sig"] != "old"
    verify_signed(signed, KEY.public_key())


@pytest.mark.parametrize(
    "tamper",
    [
        lambda o: o.update(a=2),
        lambda o: o.update(extra=None),
        lambda o: o.pop("a"),
        lambda o: o["nested"].update(x="y"),
        lambda o: o.update(sig=base64.b64encode(b"\x00" * 64).decode()),
        lambda o: o.update(sig="***"),
        lambda o: o.pop("sig"),
        lambda o: o.update(sig=None),
    ],
)
def test_tampering_is_detected(tamper) -> None:
    signed = sign({"a": 1, "nested": {"x": "x"}}, KEY)
    tamper(signed)
    with pytest.raises(SignatureError):
        verify_signed(signed, KEY.public_key())


def test_other_key_is_rejected() -> None:
    signed = sign({"a": 1}, KEY)
    with pytest.raises(SignatureError):
        verify_signed(signed, Ed25519PrivateKey.generate().public_key())


def test_public_key_b64_round_trip() -> None:
    b64 = public_key_b64(KEY)
    assert len(base64.b64decode(b64)) == 32
    signed = sign({"a": 1}, KEY)
    verify_signed(signed, load_public_key(b64))


@pytest.mark.parametrize("text", ["not base64!", "AAAA", base64.b64encode(b"\x01" * 33).decode(), ""])
def test_load_public_key_rejects_bad_keys(text: str) -> None:
    with pytest.raises(ValueError):
        load_public_key(text)


# -- timestamps --------------------------------------------------------------------------------------------------
def test_format_ts_is_utc_milliseconds_with_z() -> None:
    when = dt.datetime(2026, 11, 29, 8, 15, 2, 123456, tzinfo=dt.timezone.utc)
    assert format_ts(when) == "2026-11-29T08:15:02.123Z"
    cst = dt.timezone(dt.timedelta(hours=8))
    assert format_ts(dt.datetime(2026, 11, 29, 16, 15, 2, 5000, tzinfo=cst)) == "2026-11-29T08:15:02.005Z"


def test_parse_ts_z_and_offsets() -> None:
    want = dt.datetime(2026, 11, 29, 8, 15, 2, 123000, tzinfo=dt.timezone.utc)
    assert parse_ts("2026-11-29T08:15:02.123Z") == want
    assert parse_ts("2026-11-29T08:15:02.123z") == want
    assert parse_ts("2026-11-29T16:15:02.123+08:00") == want
    assert parse_ts("2026-11-29T08:15:02Z") == want.replace(microsecond=0)
    assert parse_ts("2026-11-29T08:15:02.123Z").utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("text", ["2026-11-29", "2026-11-29T08:15:02", "yesterday", "", "2026-13-29T08:15:02Z"])
def test_parse_ts_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ts(text)


def test_parse_ts_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        parse_ts(1_800_000_000)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1),
                    timezones=st.just(dt.timezone.utc)))
def test_format_parse_round_trip(when: dt.datetime) -> None:
    text = format_ts(when)
    assert text.endswith("Z") and len(text) == len("2026-11-29T08:15:02.123Z")
    back = parse_ts(text)
    assert back == when.replace(microsecond=when.microsecond // 1000 * 1000)
    assert format_ts(back) == text


def test_epoch_helpers() -> None:
    assert epoch_of("1970-01-01T00:00:00.000Z") == 0.0
    assert epoch_of("2026-11-29T08:15:02.500Z") == dt.datetime(2026, 11, 29, 8, 15, 2, 500000,
                                                                tzinfo=dt.timezone.utc).timestamp()
    assert ts_from_epoch(0) == "1970-01-01T00:00:00.000Z"
    assert ts_from_epoch(1_800_000_000.25) == "2027-01-15T08:00:00.250Z"
    assert epoch_of(ts_from_epoch(1_800_000_000.25)) == 1_800_000_000.25


def test_hash_of_canonical_json_is_stable() -> None:
    # the same object always hashes the same, whatever the key order (used for record hashes)
    a = hashlib.sha256(canonical({"seq": 1, "body": {"b": 1, "a": 2}})).hexdigest()
    b = hashlib.sha256(canonical({"body": {"a": 2, "b": 1}, "seq": 1})).hexdigest()
    assert a == b
