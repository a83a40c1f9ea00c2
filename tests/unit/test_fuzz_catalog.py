"""Fuzzing the catalog document reader and installer (issue 8): whatever arrives on a catalog
topic, ``CatalogStore.install_bytes`` installs it or raises ``CatalogError`` with a reason of
mqtt.md (``bad_signature``, ``stale``, ``base_mismatch``, ``invalid``), and a refused document
leaves the installed catalog exactly as it was. Forged and tampered documents are refused
whatever they hold; the product validator (``product_row``) raises nothing but
``DocumentError``.

Each example installs into a real SQLite catalog in a temporary directory.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.errors import CatalogError
from agent.protocol import canonical, sign
from agent.store.catalog import CatalogStore
from agent.store.catalog_doc import DocumentError, gtin14, product_row
from drivers.gs1 import with_check_digit

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
REASONS = {"bad_signature", "stale", "base_mismatch", "invalid"}
AT = dt.datetime(2026, 11, 29, 8, 0, tzinfo=dt.timezone.utc)
BASE_VERSION = 10

FUZZ = settings(max_examples=80, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def gtin(n: int) -> str:
    return "0" + with_check_digit(f"{690100000000 + n:012d}")


def product(n: int, **over: Any) -> dict[str, Any]:
    p = {"gtin": gtin(n), "name": f"Product {n}", "producer": "Co-op", "origin": "county, province",
         "cert_id": f"PA-{n:06d}", "valid_from": "2026-01-01", "valid_until": "2027-12-31",
         "unit_weight_g": 250.0, "weight_tolerance_g": 6.0}
    p.update(over)
    return p


BASE_PRODUCTS = [product(n) for n in range(1, 6)]


def document(version: int, products: list[Any], base: int | None = None, revoked: list[Any] | None = None,
             **extra: Any) -> dict[str, Any]:
    return {"version": version, "base_version": base, "issued_at": "2026-11-28T00:00:00.000Z",
            "products": products, "revoked": revoked or [], **extra}


def signed_bytes(doc: dict[str, Any], key: Ed25519PrivateKey = KEY) -> bytes:
    return json.dumps(sign(doc, key), ensure_ascii=False).encode("utf-8")


@contextlib.contextmanager
def store_with_base() -> Iterator[CatalogStore]:
    """A fresh catalog store holding version BASE_VERSION of BASE_PRODUCTS."""
    with tempfile.TemporaryDirectory(prefix="fuzz-catalog-") as tmp:
        store = CatalogStore(Path(tmp) / "catalog.db", KEY.public_key())
        try:
            result = store.install_bytes(signed_bytes(document(BASE_VERSION, BASE_PRODUCTS)))
            assert result.outcome == "installed"
            yield store
        finally:
            store.close()


def snapshot_of(store: CatalogStore) -> tuple[Any, ...]:
    """What a refused install must leave as it was."""
    looks = tuple((store.lookup(p["gtin"], AT).certified, store.lookup(p["gtin"], AT).reason) for p in BASE_PRODUCTS)
    return store.version, store.issued_at, store.product_count, looks


def install_outcome(store: CatalogStore, data: bytes) -> tuple[str, Any]:
    """('installed' | 'same_version' | reason, detail); anything but CatalogError propagates."""
    try:
        result = store.install_bytes(data)
    except CatalogError as exc:
        assert exc.reason in REASONS, exc.reason
        return exc.reason, exc
    return result.outcome, result


# ------------------------------------------------------------------ strategies

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=12)
date_text = st.one_of(st.dates().map(str), st.text(max_size=12), json_any)
codes = st.one_of(st.integers(0, 10**6).map(gtin), st.text(alphabet="0123456789", max_size=16), json_any)


@st.composite
def products(draw: st.DrawFn) -> Any:
    """A product whose every field may be valid, missing, or anything."""
    if draw(st.integers(0, 19)) == 0:
        return draw(json_any)
    fields = {
        "gtin": codes, "name": st.one_of(st.text(max_size=20), json_any),
        "producer": st.one_of(st.text(max_size=10), json_any), "origin": st.one_of(st.text(max_size=10), json_any),
        "cert_id": st.one_of(st.text(max_size=10), json_any), "valid_from": date_text, "valid_until": date_text,
        "unit_weight_g": st.one_of(st.floats(), st.integers(), json_any),
        "weight_tolerance_g": st.one_of(st.floats(), st.integers(), json_any),
    }
    good = product(draw(st.integers(100, 10**6)))
    out = {}
    for name, strategy in fields.items():
        choice = draw(st.integers(0, 5))
        if choice == 0:
            continue                     # missing
        out[name] = draw(strategy) if choice == 1 else good[name]
    return out


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A catalog document with every header field valid, missing or anything."""
    doc: dict[str, Any] = {}
    header = {
        "version": st.one_of(st.integers(-2, BASE_VERSION + 5), json_any),
        "base_version": st.one_of(st.none(), st.integers(-1, BASE_VERSION + 2), json_any),
        "issued_at": st.one_of(st.just("2026-11-28T00:00:00.000Z"), st.text(max_size=25), json_any),
        "products": st.one_of(st.lists(products(), max_size=6), json_any),
        "revoked": st.one_of(st.lists(codes, max_size=3), json_any),
    }
    for name, strategy in header.items():
        if draw(st.integers(0, 7)):
            doc[name] = draw(strategy)
    doc.update(draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k not in header and k != "sig"),
                                    json_any, max_size=2)))
    return doc


# ------------------------------------------------------------------ properties


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), json_any.map(lambda v: json.dumps(v).encode()),
                      documents().map(lambda d: json.dumps(d).encode()),
                      documents().map(lambda d: signed_bytes(d)).flatmap(
                          lambda b: st.integers(0, len(b)).map(lambda k: b[:k]))))
def test_any_bytes_are_installed_or_refused_with_a_contract_reason_and_a_refusal_changes_nothing(data: bytes) -> None:
    with store_with_base() as store:
        before = snapshot_of(store)
        outcome, _detail = install_outcome(store, data)
        if outcome in REASONS:
            assert snapshot_of(store) == before


@FUZZ
@given(doc=documents())
def test_a_signed_document_of_any_content_is_installed_only_when_it_is_valid(doc: dict[str, Any]) -> None:
    with store_with_base() as store:
        before = snapshot_of(store)
        outcome, detail = install_outcome(store, signed_bytes(doc))
        if outcome in REASONS:
            assert outcome != "bad_signature", detail   # it was signed with the platform's key
            assert snapshot_of(store) == before
            return
        if outcome == "same_version":
            assert doc.get("version") == BASE_VERSION and snapshot_of(store) == before
            return
        # installed: then the document was valid as a whole, and what is installed is what it says
        version = doc["version"]
        assert type(version) is int and version > BASE_VERSION and store.version == version
        assert doc["base_version"] in (None, BASE_VERSION)
        rows = [product_row(p) for p in doc["products"]]          # every product valid
        revoked = {gtin14(code) for code in doc.get("revoked", [])}  # and every revoked code a GTIN
        if doc["base_version"] is None:
            assert store.product_count <= len(rows)
        for row in rows:
            if row[0] not in revoked:
                assert store.product(row[0]) is not None


@FUZZ
@given(doc=documents(), forged=st.booleans(), sig=st.one_of(st.text(max_size=100), json_any,
                                                          st.binary(min_size=64, max_size=64).map(
                                                              lambda b: base64.b64encode(b).decode())))
def test_a_forged_or_unsigned_document_is_refused_whatever_it_holds(doc: dict[str, Any], forged: bool,
                                                                    sig: Any) -> None:
    if forged:
        data = signed_bytes(doc, OTHER)
    else:
        data = json.dumps(dict(doc, sig=sig)).encode()
    with store_with_base() as store:
        before = snapshot_of(store)
        outcome, _ = install_outcome(store, data)
        # "same_version" would be silently ignored: nothing changes either
        assert outcome in REASONS | {"same_version"}
        assert snapshot_of(store) == before


@FUZZ
@given(n=st.integers(1, 5), data=st.data())
def test_a_tampered_valid_document_is_refused(n: int, data: st.DataObject) -> None:
    doc = document(BASE_VERSION + 1, [product(i) for i in range(100, 100 + n)], revoked=[BASE_PRODUCTS[0]["gtin"]])
    signed = sign(doc, KEY)
    where = data.draw(st.sampled_from(["product", "header", "revoked", "extra", "drop"]))
    if where == "product":
        item = signed["products"][data.draw(st.integers(0, n - 1))]
        field = data.draw(st.sampled_from(sorted(item)))
        item[field] = data.draw(json_any)
    elif where == "header":
        field = data.draw(st.sampled_from(["version", "base_version", "issued_at"]))
        signed[field] = data.draw(json_any)
    elif where == "revoked":
        signed["revoked"] = data.draw(st.lists(codes, max_size=3))
    elif where == "extra":
        signed[data.draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in signed))] = data.draw(json_any)
    else:
        signed["products"].pop(data.draw(st.integers(0, n - 1)))
    assume(canonical({k: v for k, v in signed.items() if k != "sig"}) != canonical(doc))
    with store_with_base() as store:
        before = snapshot_of(store)
        outcome, _ = install_outcome(store, json.dumps(signed).encode())
        assert outcome in REASONS | {"same_version"}
        assert snapshot_of(store) == before


@FUZZ
@given(items=st.lists(st.integers(100, 10**6), min_size=1, max_size=8, unique=True),
       delta=st.booleans(), revoke=st.integers(0, 5))
def test_a_valid_document_is_installed_exactly(items: list[int], delta: bool, revoke: int) -> None:
    new = [product(i, unit_weight_g=float(i % 900 + 1)) for i in items]
    revoked = [p["gtin"] for p in BASE_PRODUCTS[:revoke]]
    doc = document(BASE_VERSION + 1, new, base=BASE_VERSION if delta else None, revoked=revoked)
    with store_with_base() as store:
        outcome, detail = install_outcome(store, signed_bytes(doc))
        assert outcome == "installed", detail
        assert store.version == BASE_VERSION + 1
        for p in new:
            assert store.lookup(p["gtin"], AT).certified
        kept = BASE_PRODUCTS[revoke:] if delta else []
        for p in kept:
            assert store.lookup(p["gtin"], AT).certified
        for p in BASE_PRODUCTS[:revoke]:
            assert not store.lookup(p["gtin"], AT).certified
        assert store.product_count == len(new) + len(kept)


@pytest.mark.parametrize("version,base,reason", [(BASE_VERSION - 1, None, "stale"),
                                                 (BASE_VERSION + 1, BASE_VERSION - 1, "base_mismatch"),
                                                 (BASE_VERSION + 1, BASE_VERSION + 1, "base_mismatch")])
def test_stale_and_mismatched_documents_are_refused(version: int, base: int | None, reason: str) -> None:
    with store_with_base() as store:
        before = snapshot_of(store)
        outcome, _ = install_outcome(store, signed_bytes(document(version, [product(77)], base=base)))
        assert outcome == reason
        assert snapshot_of(store) == before


@FUZZ
@given(item=st.one_of(products(), json_any))
def test_product_row_raises_only_document_error(item: Any) -> None:
    try:
        row = product_row(item)
    except DocumentError:
        return
    assert len(row) == 9 and len(row[0]) == 14 and row[7] > 0 and row[8] >= 0


# ------------------------------------------------------------------ deep nesting
# Found by this fuzzing: canonical() re-serialising a deeply nested member raised RecursionError out
# of install_bytes, with memory growing with the square of the depth (a 200 kB message could exhaust
# a cabinet's RAM). Refused as invalid since c994de5 (catalog_doc.MAX_DEPTH).

NESTED = 2000   # deep enough for Python's recursion limit; far below any message size limit


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def test_a_deeply_nested_header_member_is_refused_as_invalid() -> None:
    sig = base64.b64encode(bytes(64)).decode()
    data = b'{"x":' + _deep(NESTED) + b',"version":11,"base_version":null,"issued_at":"2026-11-28T00:00:00Z",' \
        b'"products":[],"revoked":[],"sig":"' + sig.encode() + b'"}'
    with store_with_base() as store:
        before = snapshot_of(store)
        outcome, _ = install_outcome(store, data)
        assert outcome in REASONS
        assert snapshot_of(store) == before


def test_a_deeply_nested_product_is_refused_as_invalid() -> None:
    sig = base64.b64encode(bytes(64)).decode()
    data = b'{"version":11,"base_version":null,"issued_at":"2026-11-28T00:00:00Z","products":[' + _deep(NESTED) \
        + b'],"revoked":[],"sig":"' + sig.encode() + b'"}'
    with store_with_base() as store:
        outcome, _ = install_outcome(store, data)
        assert outcome in REASONS
