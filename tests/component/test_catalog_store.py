"""CatalogStore: signed installs (snapshot, delta, refusals), lookups, atomicity under SIGKILL.

Real SQLite files in tmp_path and real Ed25519 keys throughout; the crash tests run the install
in a child process and kill it at a point it reports itself, never after a guessed delay.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import CatalogError, GtinError
from agent.protocol import canonical, parse_ts, public_key_b64, sign
from agent.store.catalog import _LOOKUP_SQL, CatalogStore, InstallResult, Lookup, Product
from agent.store.catalog_doc import MAX_DEPTH, DocumentError, gtin14, read_skeleton, write_canonical
from drivers.gs1 import normalize, with_check_digit

ROOT = Path(__file__).resolve().parent.parent.parent
UTC = dt.timezone.utc
AT = dt.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ISSUED = "2026-11-29T08:00:00.000Z"


def gtin(i: int) -> str:
    return with_check_digit(f"0690{i:09d}")


def prod(i: int, **kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "gtin": gtin(i), "name": f"Dried shiitake {i}", "producer": "Fuping Mushroom Cooperative",
        "origin": "Fuping, Hebei", "cert_id": f"PA-2026-{i:06d}",
        "valid_from": "2026-01-01", "valid_until": "2027-12-31",
        "unit_weight_g": 250.0, "weight_tolerance_g": 6.0,
    }
    p.update(kw)
    return p


def doc(version: int, products: list[dict[str, Any]], revoked: list[str] | None = None,
        base: int | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"version": version, "base_version": base, "issued_at": ISSUED, "products": products,
                         "revoked": revoked or []}
    d.update(extra)
    return d


def signed(key: Ed25519PrivateKey, d: dict[str, Any], **dumps_kw: Any) -> bytes:
    return json.dumps(sign(d, key), **dumps_kw).encode("utf-8")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> Iterator[CatalogStore]:
    s = CatalogStore(tmp_path / "catalog.db", key.public_key())
    yield s
    s.close()


def refused(store: CatalogStore, data: bytes) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        store.install_bytes(data)
    return info.value


# -- installs ---------------------------------------------------------------------------------------


def test_empty_store_reads(store: CatalogStore) -> None:
    assert store.version is None and store.issued_at is None and store.installed_at is None
    assert store.product_count == 0
    assert store.info() == {"version": None, "issued_at": None, "installed_at": None, "products": 0}
    assert store.lookup(gtin(1), AT) == Lookup(False, "unknown", gtin(1), None)


def test_snapshot_install(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    before = dt.datetime.now(UTC)
    result = store.install_bytes(signed(key, doc(5, [prod(1), prod(2, weight_tolerance_g=4)], [gtin(9)])))
    assert result == InstallResult("installed", 5, 2, False)
    assert store.version == 5 and store.issued_at == ISSUED and store.product_count == 2
    installed_at = parse_ts(store.installed_at or "")
    assert before - dt.timedelta(seconds=1) <= installed_at <= dt.datetime.now(UTC) + dt.timedelta(seconds=1)
    assert store.info() == {"version": 5, "issued_at": ISSUED, "installed_at": store.installed_at, "products": 2}
    assert store.product(gtin(2)) == Product(
        gtin(2), "Dried shiitake 2", "Fuping Mushroom Cooperative", "Fuping, Hebei", "PA-2026-000002",
        dt.date(2026, 1, 1), dt.date(2027, 12, 31), 250.0, 4.0)
    assert store.product(gtin(3)) is None
    look = store.lookup(gtin(1), AT)
    assert look.certified and look.reason is None and look.gtin == gtin(1)
    assert look.product is not None and look.product.name == "Dried shiitake 1"
    assert store.lookup(gtin(9), AT) == Lookup(False, "revoked", gtin(9), None)


def test_product_as_dict_is_the_document_form(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    listed = prod(3, gtin=gtin(3)[1:], valid_until="2026-12-31", unit_weight_g=99.5)  # listed as a GTIN-13
    store.install_bytes(signed(key, doc(1, [listed])))
    product = store.product(gtin(3))
    assert product is not None
    assert product.as_dict() == {**listed, "gtin": gtin(3)}
    assert json.loads(json.dumps(product.as_dict())) == product.as_dict()


def test_snapshot_replaces_everything(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    store.install_bytes(signed(key, doc(1, [prod(1), prod(2)], [gtin(8)])))
    result = store.install_bytes(signed(key, doc(2, [prod(3)], [gtin(9)])))
    assert result == InstallResult("installed", 2, 1, False)
    assert store.lookup(gtin(1), AT).reason == "unknown"
    assert store.lookup(gtin(8), AT).reason == "unknown"  # revoked by the old catalog only
    assert store.lookup(gtin(9), AT).reason == "revoked"
    assert store.lookup(gtin(3), AT).certified


def test_delta_upserts_and_revokes(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    store.install_bytes(signed(key, doc(1, [prod(1), prod(2), prod(3)])))
    delta = doc(2, [prod(1, name="Shiitake, new label"), prod(4)], [gtin(2)], base=1)
    assert store.install_bytes(signed(key, delta)) == InstallResult("installed", 2, 3, True)
    assert store.product(gtin(1)).name == "Shiitake, new label"  # type: ignore[union-attr]
    assert store.lookup(gtin(4), AT).certified
    assert store.lookup(gtin(3), AT).certified  # untouched
    assert store.lookup(gtin(2), AT) == Lookup(False, "revoked", gtin(2), None)
    assert store.product(gtin(2)) is None

    # Re-added later: no longer revoked. Listed and revoked in the same delta: revoked wins.
    again = doc(3, [prod(2, name="back again"), prod(5)], [gtin(5), gtin(3)], base=2)
    assert store.install_bytes(signed(key, again)) == InstallResult("installed", 3, 3, True)
    assert store.lookup(gtin(2), AT).certified and store.product(gtin(2)).name == "back again"  # type: ignore[union-attr]
    assert store.lookup(gtin(5), AT).reason == "revoked"
    assert store.lookup(gtin(3), AT).reason == "revoked"
    assert store.product_count == 3  # 1, 2, 4


def test_base_mismatch(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    err = refused(store, signed(key, doc(2, [prod(1)], base=1)))
    assert (err.reason, err.version) == ("base_mismatch", 2)
    assert store.version is None and store.product_count == 0

    store.install_bytes(signed(key, doc(3, [prod(1)])))
    err = refused(store, signed(key, doc(8, [prod(2)], [gtin(1)], base=7)))
    assert (err.reason, err.version) == ("base_mismatch", 8)
    assert store.version == 3 and store.lookup(gtin(1), AT).certified and store.product(gtin(2)) is None


def test_stale_and_same_version(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    original = signed(key, doc(5, [prod(1)]))
    store.install_bytes(original)
    installed_at = store.installed_at

    err = refused(store, signed(key, doc(4, [prod(2)])))
    assert (err.reason, err.version) == ("stale", 4)
    # The same bytes again (the retained snapshot after a reconnect) and the same version
    # serialised or even signed differently: ignored, nothing changes.
    assert store.install_bytes(original) == InstallResult("same_version", 5, 1, False)
    assert store.install_bytes(signed(key, doc(5, [prod(1)]), indent=2)) == InstallResult("same_version", 5, 1, False)
    assert store.install_bytes(signed(key, doc(5, [prod(7)]))).outcome == "same_version"
    assert store.installed_at == installed_at and store.product(gtin(7)) is None
    assert store.lookup(gtin(1), AT).certified


def test_forged_signatures(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    store.install_bytes(signed(key, doc(1, [prod(1)])))
    good = sign(doc(2, [prod(2)], extra_info={"note": "x"}), key)

    tampered = json.loads(json.dumps(good))
    tampered["products"][0]["valid_until"] = "2099-12-31"
    tampered_unknown = json.loads(json.dumps(good))
    tampered_unknown["extra_info"]["note"] = "y"
    other_key = sign(doc(2, [prod(2)]), Ed25519PrivateKey.generate())
    missing = {k: v for k, v in good.items() if k != "sig"}
    not_b64 = dict(good, sig="not base64!")
    short = dict(good, sig=base64.b64encode(b"x" * 63).decode())
    # The signature is checked before anything else of the content: a forged stale or invalid
    # document is reported as forged.
    forged_stale = dict(sign(doc(0, [prod(2)]), key), issued_at="2026-01-01T00:00:00Z")
    forged_invalid = sign(doc(3, [prod(2)]), key)
    forged_invalid["products"][0]["gtin"] = "06901234567890"  # bad check digit, and not signed

    for forged in (tampered, tampered_unknown, other_key, missing, not_b64, short, forged_stale, forged_invalid):
        err = refused(store, json.dumps(forged).encode())
        assert err.reason == "bad_signature", forged
    assert store.version == 1 and store.product(gtin(2)) is None and store.lookup(gtin(1), AT).certified
    assert store.install_bytes(json.dumps(good).encode()).outcome == "installed"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda k: b'{"version": 2,', id="truncated"),
        pytest.param(lambda k: b"not json at all", id="not-json"),
        pytest.param(lambda k: b"[1, 2]", id="array"),
        pytest.param(lambda k: b"", id="empty"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2)])) + b" {}", id="trailing-garbage"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, gtin="06901234567890")])), id="bad-check-digit"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, gtin="69012345678")])), id="gtin-11-digits"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, gtin=6901234567892)])), id="gtin-number"),
        pytest.param(lambda k: signed(k, doc(2, [{x: v for x, v in prod(2).items() if x != "name"}])),
                     id="product-missing-name"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, valid_until="2026-13-01")])), id="bad-date"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, valid_from="20260101")])), id="basic-iso-date"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, valid_from="2027-01-01", valid_until="2026-01-01")])),
                     id="until-before-from"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, unit_weight_g="250")])), id="weight-string"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, unit_weight_g=True)])), id="weight-bool"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, unit_weight_g=0)])), id="weight-zero"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2, weight_tolerance_g=-1)])), id="tolerance-negative"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2), "not an object"])), id="product-not-object"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2), prod(2, gtin=gtin(2)[1:])])), id="duplicate-gtin"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2)], ["06901234567890"])), id="revoked-bad-check-digit"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2)], revoked="all")), id="revoked-not-array"),  # type: ignore[arg-type]
        pytest.param(lambda k: signed(k, doc(2, {"a": prod(2)})), id="products-object"),  # type: ignore[arg-type]
        pytest.param(lambda k: signed(k, {x: v for x, v in doc(2, [prod(2)]).items() if x != "products"}),
                     id="products-missing"),
        pytest.param(lambda k: signed(k, {x: v for x, v in doc(2, [prod(2)]).items() if x != "version"}),
                     id="version-missing"),
        pytest.param(lambda k: signed(k, doc("2", [prod(2)])), id="version-string"),  # type: ignore[arg-type]
        pytest.param(lambda k: signed(k, {x: v for x, v in doc(2, [prod(2)]).items() if x != "base_version"}),
                     id="base-version-missing"),
        pytest.param(lambda k: signed(k, doc(2, [prod(2)], issued_at="yesterday")), id="issued-at-bad"),
        pytest.param(lambda k: json.dumps(sign(doc(2, [prod(2)]), k)).replace(
            '"version": 2', '"version": 2, "version": 3').encode(), id="duplicate-top-level-key"),
    ],
)
def test_invalid_documents(store: CatalogStore, key: Ed25519PrivateKey, make: Any) -> None:
    store.install_bytes(signed(key, doc(1, [prod(1)])))
    err = refused(store, make(key))
    assert err.reason == "invalid"
    assert store.version == 1 and store.product_count == 1 and store.lookup(gtin(1), AT).certified
    # Nothing half-done was left behind: the next good document installs.
    assert store.install_bytes(signed(key, doc(4, [prod(4)]))).outcome == "installed"
    assert store.product_count == 1 and store.lookup(gtin(4), AT).certified


def test_unknown_fields_are_signed_over_and_ignored(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    p = prod(1, name='Honey "wild" \u8702\u871c \u2028 \U0001f41d', price_hint=12.50, tags=["a", {"z": 1, "b": None}],
             serial=2**80, ratio=1e-7)
    d = doc(7, [p, prod(2, unit_weight_g=250, weight_tolerance_g=6)], [gtin(3)],
            aaa_first={"nested": [1.0, -0.0, 1e16]}, products_meta=3, zzz_last=None, big=-(2**70))
    raw = signed(key, d, ensure_ascii=True, indent=3)  # not canonical on the wire: re-canonicalised
    assert store.install_bytes(raw) == InstallResult("installed", 7, 2, False)
    product = store.product(gtin(1))
    assert product is not None and product.name == 'Honey "wild" \u8702\u871c \u2028 \U0001f41d'
    assert not hasattr(product, "price_hint")
    assert store.product(gtin(2)).unit_weight_g == 250.0  # type: ignore[union-attr]

    # The unknown fields are covered by the signature: change one and it no longer verifies.
    forged = json.loads(raw)
    forged["products"][0]["tags"][1]["z"] = 2
    forged["version"] = 8
    assert refused(store, json.dumps(forged).encode()).reason == "bad_signature"


# -- canonical bytes without the object tree ----------------------------------------------------------

_json_scalars = (
    st.none() | st.booleans() | st.text(max_size=12)
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
)
_json = st.recursive(
    _json_scalars | st.integers(),  # unbounded ints too: they take the pure-Python parser
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    top=st.dictionaries(st.text(max_size=10), _json, max_size=5),
    products=st.lists(st.dictionaries(st.text(max_size=8), _json, max_size=5), max_size=6),
    indent=st.sampled_from([None, 0, 2]),
    ascii_only=st.booleans(),
)
def test_streamed_canonical_bytes_equal_json_dumps(
    top: dict[str, Any], products: list[dict[str, Any]], indent: int | None, ascii_only: bool
) -> None:
    document = dict(top)
    document["products"] = products
    document["sig"] = "x"
    raw = json.dumps(document, indent=indent, ensure_ascii=ascii_only).encode("utf-8")
    skeleton = read_skeleton(lambda: io.BytesIO(raw))
    out = io.BytesIO()
    seen: list[Any] = []
    count = write_canonical(skeleton, lambda: io.BytesIO(raw), out, seen.extend)
    expected = json.loads(raw)
    del expected["sig"]
    assert out.getvalue() == canonical(expected)
    assert count == len(products) and seen == expected["products"]


def _nested(depth: int) -> Any:
    """A JSON value whose deepest container is ``depth`` levels down (1: an empty list)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("where", ["header", "product"])
def test_nesting_up_to_max_depth_is_read_deeper_is_invalid(where: str) -> None:
    # The top-level object is depth 1, so a member or a product field holds MAX_DEPTH - 1 or
    # MAX_DEPTH - 3 more levels (products array, product object) at the limit.
    def document(extra: int) -> bytes:
        if where == "header":
            d = doc(1, [prod(1)], x=_nested(MAX_DEPTH - 1 + extra))
        else:
            d = doc(1, [prod(1, note=_nested(MAX_DEPTH - 3 + extra))])
        return json.dumps(d).encode()

    at_limit = document(0)
    skeleton = read_skeleton(lambda: io.BytesIO(at_limit))
    out = io.BytesIO()
    write_canonical(skeleton, lambda: io.BytesIO(at_limit), out)
    assert out.getvalue() == canonical(json.loads(at_limit))
    with pytest.raises(DocumentError, match=f"more than {MAX_DEPTH} levels deep"):
        read_skeleton(lambda: io.BytesIO(document(1)))


_DEEP_CHILD = r"""
import base64, sys
sys.path.insert(0, sys.argv[1])
from agent.errors import CatalogError
from agent.protocol import load_public_key
from agent.store.catalog import CatalogStore
store = CatalogStore(sys.argv[2], load_public_key(sys.argv[3]))
deep = (b'{"x":' + b"[" * 20_000 + b"]" * 20_000 + b',"version":2,"base_version":null,'
        b'"issued_at":"2026-11-29T08:00:00.000Z","products":[],"sig":"' + base64.b64encode(bytes(64)) + b'"}')
try:
    store.install_bytes(deep)
except CatalogError as exc:
    # VmHWM is this process image's own peak (ru_maxrss keeps the forking parent's across exec)
    hwm_kib = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    print(exc.reason, hwm_kib // 1024)
"""


def test_a_deeply_nested_message_is_refused_cheaply(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """20,000 levels in 40 kB: refused as invalid in the first pass (the second took ~1 GB for it).
    In a fresh process, so that its peak RSS is this install's."""
    db = tmp_path / "catalog.db"
    out = subprocess.run([sys.executable, "-c", _DEEP_CHILD, str(ROOT), str(db), public_key_b64(key)],
                         capture_output=True, text=True, timeout=60, check=True)
    reason, peak_mib = out.stdout.split()
    assert reason == "invalid"
    assert int(peak_mib) < 150, f"peak RSS {peak_mib} MiB"


@given(st.text(alphabet="0123456789", min_size=6, max_size=15) | st.text(max_size=16))
def test_fast_gtin_equals_normalize(code: str) -> None:
    try:
        expected: str | None = normalize(code)
    except GtinError:
        expected = None
    try:
        got: str | None = gtin14(code)
    except GtinError:
        got = None
    assert got == expected


# -- lookups --------------------------------------------------------------------------------------------


def test_lookup_reasons(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    store.install_bytes(signed(key, doc(1, [
        prod(1, valid_from="2026-06-01", valid_until="2026-06-30"),
        prod(2, valid_from="2026-07-01", valid_until="2026-12-31"),
        prod(3, valid_from="2025-01-01", valid_until="2026-05-31"),
    ], [gtin(4)])))
    first_day = dt.datetime(2026, 6, 1, 0, 0, tzinfo=UTC)
    last_moment = dt.datetime(2026, 6, 30, 23, 59, 59, tzinfo=UTC)
    assert store.lookup(gtin(1), first_day).certified
    assert store.lookup(gtin(1), last_moment).certified
    assert store.lookup(gtin(1), last_moment + dt.timedelta(seconds=1)).reason == "expired"
    not_yet = store.lookup(gtin(2), AT)
    assert (not_yet.certified, not_yet.reason, not_yet.gtin) == (False, "not_yet_valid", gtin(2))
    assert not_yet.product is not None and not_yet.product.valid_from == dt.date(2026, 7, 1)
    expired = store.lookup(gtin(3), AT)
    assert (expired.reason, expired.product is not None) == ("expired", True)
    assert store.lookup(gtin(4), AT) == Lookup(False, "revoked", gtin(4), None)
    assert store.lookup(gtin(5), AT) == Lookup(False, "unknown", gtin(5), None)
    bad = gtin(1)[:-1] + str((int(gtin(1)[-1]) + 1) % 10)
    assert store.lookup(bad, AT) == Lookup(False, "bad_check_digit", None, None)
    for garbage in ("", "abc", "12345", "https://example.com/qr", "069000000000170"):
        assert store.lookup(garbage, AT) == Lookup(False, "unknown", None, None), garbage
    with pytest.raises(ValueError):
        store.lookup(gtin(1), dt.datetime(2026, 6, 1, 12, 0))  # naive: whose midnight?


def test_timezone_decides_the_certificate_date(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "catalog.db"
    with_utc = CatalogStore(path, key.public_key(), "UTC")
    with_utc.install_bytes(signed(key, doc(1, [
        prod(1, valid_until="2026-12-31"), prod(2, valid_from="2027-01-01", valid_until="2027-12-31")])))
    shanghai = CatalogStore(path, key.public_key(), "Asia/Shanghai")
    los_angeles = CatalogStore(path, key.public_key(), "America/Los_Angeles")
    evening = dt.datetime(2026, 12, 31, 20, 0, tzinfo=UTC)  # 2027-01-01 04:00 in Shanghai
    assert with_utc.lookup(gtin(1), evening).certified
    assert with_utc.lookup(gtin(2), evening).reason == "not_yet_valid"
    assert shanghai.lookup(gtin(1), evening).reason == "expired"
    assert shanghai.lookup(gtin(2), evening).certified
    # Any aware datetime works; west of UTC the local date lags behind.
    morning = dt.datetime(2027, 1, 1, 5, 0, tzinfo=UTC)  # 2026-12-31 21:00 in Los Angeles
    assert with_utc.lookup(gtin(1), morning).reason == "expired"
    assert los_angeles.lookup(gtin(1), morning.astimezone(dt.timezone(dt.timedelta(hours=8)))).certified
    for s in (with_utc, shanghai, los_angeles):
        s.close()


def test_retail_code_forms_map_to_gtin14(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    # Catalog GTINs may come in any length; they are stored as GTIN-14.
    products = [prod(0, gtin="4006381333931"), prod(1, gtin="036000291452"), prod(2, gtin="96385074"),
                prod(3, gtin="00042100005264")]
    store.install_bytes(signed(key, doc(1, products)))
    cases = [
        ("4006381333931", None, "04006381333931"),  # EAN-13
        ("04006381333931", None, "04006381333931"),  # GTIN-14
        ("036000291452", "UPCA", "00036000291452"),  # UPC-A
        ("0036000291452", "EAN13", "00036000291452"),  # UPC-A read as EAN-13
        ("96385074", "EAN8", "00000096385074"),  # EAN-8
        ("04252614", "UPCE", "00042100005264"),  # UPC-E, expanded to UPC-A 042100005264
    ]
    for code, symbology, expected in cases:
        look = store.lookup(code, AT, symbology)
        assert (look.certified, look.gtin) == (True, expected), code
    assert store.product("4006381333931") == store.product("04006381333931") is not None
    assert store.product_count == 4


def test_lookup_is_an_index_search(store: CatalogStore, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    store.install_bytes(signed(key, doc(1, [prod(i) for i in range(50)], [gtin(99)])))
    conn = sqlite3.connect(tmp_path / "catalog.db")
    plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + _LOOKUP_SQL, (gtin(1),)))
    conn.close()
    assert "SCAN p" not in plan and "SCAN revoked" not in plan, plan
    assert "SEARCH p USING INDEX products_gtin" in plan and "SEARCH revoked USING PRIMARY KEY" in plan, plan


# -- files, progress, concurrency -------------------------------------------------------------------------


def test_install_file_reports_progress(store: CatalogStore, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_bytes(signed(key, doc(1, [prod(i) for i in range(3000)])))
    calls: list[tuple[int, int]] = []
    result = store.install_file(path, lambda done, total: calls.append((done, total)))
    assert result == InstallResult("installed", 1, 3000, False)
    size = path.stat().st_size
    assert calls and all(total == 2 * size for _, total in calls)
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and dones[-1] == 2 * size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.db", "catalog.db-shm", "catalog.db-wal",
                                                          "catalog.json"]


def test_install_file_from_a_pipe(store: CatalogStore, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    data = signed(key, doc(1, [prod(i) for i in range(500)]))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        assert store.install_file(fifo) == InstallResult("installed", 1, 500, False)
    finally:
        writer.join(10)
    assert store.lookup(gtin(499), AT).certified


def _old_catalog(key: Ed25519PrivateKey) -> bytes:
    """v1: product 1 certified ("old"), product 2 revoked."""
    return signed(key, doc(1, [prod(1, name="old")], [gtin(2)]))


def _new_catalog(key: Ed25519PrivateKey, filler: int) -> dict[str, Any]:
    """v2: product 1 revoked, product 2 certified ("new"), plus filler products."""
    return doc(2, [prod(2, name="new")] + [prod(i) for i in range(10, 10 + filler)], [gtin(1)])


def _view(s: CatalogStore) -> tuple[Any, ...]:
    one, two = s.lookup(gtin(1), AT), s.lookup(gtin(2), AT)
    return (one.reason, one.product.name if one.product else None,
            two.reason, two.product.name if two.product else None)


OLD_VIEW = (None, "old", "revoked", None)
NEW_VIEW = ("revoked", None, None, "new")


def test_readers_see_old_or_new_never_a_mix(store: CatalogStore, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    store.install_bytes(_old_catalog(key))
    filler = 20000
    path = tmp_path / "v2.json"
    path.write_bytes(signed(key, _new_catalog(key, filler)))

    # A reader that runs *while the installer is inside its transaction* (called from the
    # installer's progress callback, past the staging of most products) sees the old catalog.
    mid_install: list[Any] = []

    def read_in_other_thread() -> None:
        mid_install.append((_view(store), store.info()["version"], store.product_count))

    def progress(done: int, total: int) -> None:
        if not mid_install and done > 0.8 * total:
            t = threading.Thread(target=read_in_other_thread)
            t.start()
            t.join(10)

    # And a reader hammering lookups meanwhile: every single read is wholly old or wholly new.
    stop = threading.Event()
    seen: list[tuple[Any, ...]] = []
    counts: set[tuple[Any, Any]] = set()
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            while not stop.is_set():
                one = store.lookup(gtin(1), AT)
                two = store.lookup(gtin(2), AT)
                seen.append((one.reason, two.reason))
                info = store.info()
                counts.add((info["version"], info["products"]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reader = threading.Thread(target=hammer)
    reader.start()
    try:
        result = store.install_file(path, progress)
    finally:
        stop.set()
        reader.join(10)
    assert not errors
    assert result == InstallResult("installed", 2, filler + 1, False)
    assert mid_install == [(OLD_VIEW, 1, 1)]
    assert _view(store) == NEW_VIEW
    # A mixed read (product table of one catalog, revoked table of the other) would say "unknown".
    assert seen and all(r1 in (None, "revoked") and r2 in (None, "revoked") for r1, r2 in seen), set(seen)
    assert counts <= {(1, 1), (2, filler + 1)}


# -- SIGKILL in the middle of an install ------------------------------------------------------------------

_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from agent.store.catalog import CatalogStore
from agent.protocol import load_public_key
db, doc, pub, mode = sys.argv[2:6]
store = CatalogStore(db, load_public_key(pub))
paused = False
def progress(done, total):
    global paused
    print("progress", done, total, flush=True)
    if mode != "race" and not paused and done >= float(mode) * total:
        paused = True
        print("paused", flush=True)
        sys.stdin.readline()  # blocks until the parent kills us, inside the install
store.install_file(doc, progress)
print("done", flush=True)
"""

CRASH_PRODUCTS = 40000


@pytest.fixture(scope="module")
def crash_docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ed25519PrivateKey, bytes, Path]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path_factory.mktemp("crash") / "v2.json"
    path.write_bytes(signed(key, _new_catalog(key, CRASH_PRODUCTS - 1)))
    return key, _old_catalog(key), path


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line.strip())
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_line(q: queue.Queue[str | None], want: Any, timeout: float = 15.0) -> str:
    """The first line for which ``want(line)`` holds; fails on EOF or after ``timeout``."""
    while True:
        try:
            line = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the installer child went silent") from None
        if line is None:
            raise AssertionError("the installer child exited before the kill point")
        if want(line):
            return line


def _fraction(line: str) -> float:
    _, done, total = line.split()
    return int(done) / int(total)


@pytest.mark.parametrize("mode", ["0.3", "0.75", "1.0", "race"],
                         ids=["pass1-parse", "pass2-staging", "staged-before-verify", "free-running"])
def test_sigkill_mid_install_leaves_old_catalog(
    tmp_path: Path, crash_docs: tuple[Ed25519PrivateKey, bytes, Path], mode: str
) -> None:
    key, old, new_path = crash_docs
    db = tmp_path / "catalog.db"
    setup = CatalogStore(db, key.public_key())
    setup.install_bytes(old)
    setup.close()

    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(ROOT), str(db), str(new_path), public_key_b64(key), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        lines = _lines(proc)
        if mode == "race":
            # Killed late, at whatever it is doing then (verify, swap, commit or done).
            _wait_line(lines, lambda s: s == "done" or (s.startswith("progress") and _fraction(s) >= 0.97))
        else:
            _wait_line(lines, lambda s: s == "paused")
            # While the child sits inside its install, another process reads the old catalog.
            during = CatalogStore(db, key.public_key())
            assert _view(during) == OLD_VIEW and during.info()["version"] == 1
            during.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    after = CatalogStore(db, key.public_key())
    committed = mode == "race" and after.version == 2  # the kill came after COMMIT: all of v2
    if committed:
        assert _view(after) == NEW_VIEW and after.product_count == CRASH_PRODUCTS
    else:
        assert _view(after) == OLD_VIEW
        assert after.info()["version"] == 1 and after.product_count == 1
    # Nothing staged survived, no stray files, and the install now runs to the end.
    conn = sqlite3.connect(db)
    tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert tables == ["catalog_meta", "products", "revoked"]
    assert {p.name for p in tmp_path.iterdir()} <= {"catalog.db", "catalog.db-wal", "catalog.db-shm"}
    result = after.install_file(new_path)
    assert result.outcome == ("same_version" if committed else "installed")
    assert _view(after) == NEW_VIEW and after.product_count == CRASH_PRODUCTS
    after.close()
