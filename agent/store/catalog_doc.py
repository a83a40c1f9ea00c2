"""Streaming reader of signed catalog documents (mqtt.md, Catalog documents).

A national snapshot holds about a million products (~230 MB of JSON), far too much to hold as
Python objects on a cabinet. The signature, however, covers the canonical JSON of the *whole*
document without ``sig`` (``json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``), and Ed25519 cannot be verified incrementally. So the document is read in
two streaming passes and its canonical bytes are rebuilt into a file, never into memory:

1. ``read_skeleton``: an event-level pass over the whole document that checks its JSON syntax,
   skips the ``products`` array at C speed and builds every other top-level value (small: version,
   base_version, issued_at, revoked, sig, unknown fields).
2. ``write_canonical``: writes ``{`` + the top-level keys in sorted order + ``}``; the
   ``products`` array, which sorts between the other keys, is streamed item by item with ijson
   and each batch is re-serialised by ``agent.protocol.canonical``, so its bytes are those
   the platform signed. Each batch is also handed to the caller (to stage it in SQLite).

Numbers are parsed with ``use_float=True`` so that they print back exactly as ``json.dumps``
prints what ``json.loads`` returns (``250.0`` stays ``250.0``, ``1e2`` becomes ``100.0``).
yajl2_c cannot hold integers beyond 64 bits where ``json.loads`` can: such a document is read
with ijson's pure-Python backend instead (slow, but exact). Unknown fields are ignored by the
store but they are part of the canonical bytes, as the platform signed them.

Also here: the validation of the header and of each product (``product_row``), kept next to the
parser so the store only deals with rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import math
import operator
import re
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, BinaryIO, Protocol

import ijson
import ijson.common

from agent.errors import GtinError
from agent.protocol import canonical, parse_ts
from drivers.gs1 import normalize

log = logging.getLogger(__name__)

BATCH = 1000
"""Products per batch: enough to amortise per-call costs; bigger batches leave the heap
fragmented, and what the heap keeps adds to the RSS peak of the signature check."""

MAX_DEPTH = 64
"""Deepest nesting a document may have (its top-level object is depth 1; a real one is 4 deep).
Deeper is refused in pass 1: ijson builds a path per event, so a 40 kB message nested 20,000
deep would cost pass 2 a gigabyte, and the encoder stops at the recursion limit anyway."""

_BUF_SIZE = 256 * 1024
_DEPTH = {"start_map": 1, "start_array": 1, "end_map": -1, "end_array": -1}
# Depths inside a top-level member (1 is the member's own container): a dict lookup is as fast
# as ``bool`` in _skip_container's C pipeline, a range test three times slower.
_INSIDE = dict.fromkeys(range(1, MAX_DEPTH), True)

class DocumentError(ValueError):
    """The document is not a valid catalog document (CatalogError reason ``invalid``)."""


@dataclasses.dataclass
class Skeleton:
    """Every top-level member except a streamed ``products`` array (that one stays on disk)."""

    values: dict[str, Any]
    products_streamed: bool
    backend: Any


@dataclasses.dataclass(frozen=True)
class Header:
    """The validated top-level fields of a document."""

    version: int
    base_version: int | None
    issued_at: str
    revoked: tuple[str, ...]  # GTIN-14, in document order, without duplicates


class Source(Protocol):
    """What a pass reads from: ``read`` bytes, and a context manager that closes the stream
    (an open file, or the store's counting wrapper around one)."""

    def read(self, n: int = -1, /) -> bytes: ...
    def __enter__(self) -> Source: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None, /) -> object: ...


class CountingReader:
    """A read-only file wrapper that reports every chunk read (progress of a pass)."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._on_read = on_read

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data and self._on_read is not None:
            self._on_read(len(data))
        return data


_YAJL = ijson.get_backend("yajl2_c") if ijson.backend == "yajl2_c" else ijson
_PYTHON = ijson.get_backend("python")


def _is_int_overflow(exc: Exception) -> bool:
    return "integer overflow" in str(exc)


def read_skeleton(open_stream: Callable[[], Source]) -> Skeleton:
    """Pass 1 over a fresh stream from ``open_stream``; raises DocumentError on bad JSON.

    Retries with ijson's pure-Python backend when yajl reports an integer beyond 64 bits, so
    that every document ``json.loads`` reads is read here too.
    """
    with open_stream() as raw:
        try:
            return _read_skeleton(raw, _YAJL)
        except ijson.common.JSONError as exc:
            if not _is_int_overflow(exc) or _YAJL is _PYTHON:
                raise _json_error(exc) from None
    log.info("catalog document has integers beyond 64 bits: reading it with the pure-Python parser")
    with open_stream() as raw:
        try:
            return _read_skeleton(raw, _PYTHON)
        except (ijson.common.JSONError, ValueError) as exc:
            raise _json_error(exc) from None


def _json_error(exc: Exception) -> DocumentError:
    # yajl says "numeric overflow" of a number beyond a double (1e400): valid JSON text, but
    # no weight or price can be that, and the operator should read what is wrong
    if "overflow" in str(exc):
        return DocumentError(f"a number is out of range: {_short(exc)}")
    return DocumentError(f"not valid JSON: {_short(exc)}")


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _read_skeleton(raw: Source, backend: Any) -> Skeleton:
    events = iter(backend.basic_parse(raw, use_float=True, buf_size=_BUF_SIZE))
    first = next(events, None)
    if first is None or first[0] != "start_map":
        # Drain to report a syntax error in preference to "not an object".
        for _ in events:
            pass
        raise DocumentError("a catalog document is a JSON object")
    values: dict[str, Any] = {}
    streamed = False
    for event, value in events:
        if event == "end_map":
            break
        key = value  # event is "map_key": the parser guarantees it at this depth
        if key in values or (key == "products" and streamed):
            raise DocumentError(f"duplicate top-level key {key!r}")
        event, value = next(events)
        if key == "products" and event == "start_array":
            _skip_container(events)
            streamed = True
        else:
            values[key] = _build(event, value, events)
    for _ in events:  # the parser raises on trailing garbage only when asked for more
        pass
    return Skeleton(values, streamed, backend)


def _skip_container(events: Iterator[tuple[str, Any]]) -> None:
    """Consume events up to the end of the top-level member just opened, entirely in C;
    DocumentError if it nests deeper than MAX_DEPTH.

    The running depth is an ``itertools.accumulate`` over a dict lookup per event; ``dropwhile``
    stops at the first depth outside ``_INSIDE``: 0 at the member's end, else too deep. No Python
    bytecode runs per event, which makes skipping the 20 million events of a national snapshot
    about twice as fast as a ``for`` loop.
    """
    depths = itertools.accumulate(
        map(_DEPTH.get, map(operator.itemgetter(0), events), itertools.repeat(0)), initial=1
    )
    if next(itertools.dropwhile(_INSIDE.get, depths), 0):
        raise DocumentError(f"the document nests more than {MAX_DEPTH} levels deep")


def _build(event: str, value: Any, events: Iterator[tuple[str, Any]]) -> Any:
    if event not in ("start_map", "start_array"):
        return value
    builder = ijson.common.ObjectBuilder()
    builder.event(event, value)
    depth = 1
    for event, value in events:
        builder.event(event, value)
        depth += _DEPTH.get(event, 0)
        if depth == 0:
            return builder.value
        if depth >= MAX_DEPTH:  # a top-level member starts at depth 2
            raise DocumentError(f"the document nests more than {MAX_DEPTH} levels deep")
    raise DocumentError("document ends inside a value")  # pragma: no cover - parser raises first


def write_canonical(
    skeleton: Skeleton,
    open_stream: Callable[[], Source],
    out: BinaryIO,
    on_batch: Callable[[list[Any]], None] | None = None,
) -> int:
    """Pass 2: write the canonical JSON of the document without ``sig`` to ``out``.

    ``products`` items are streamed from a fresh ``open_stream()`` in batches of ``BATCH``;
    ``on_batch`` gets each batch (raw parsed items) after its bytes are written. Returns the
    number of products streamed.
    """
    keys = [k for k in skeleton.values if k != "sig"]
    if skeleton.products_streamed:
        keys.append("products")
    keys.sort()
    count = 0
    out.write(b"{")
    for i, key in enumerate(keys):
        if i:
            out.write(b",")
        out.write(canonical(key))
        out.write(b":")
        if key == "products" and skeleton.products_streamed:
            count = _write_products(skeleton.backend, open_stream, out, on_batch)
        else:
            out.write(canonical(skeleton.values[key]))
    out.write(b"}")
    return count


def _write_products(
    backend: Any,
    open_stream: Callable[[], Source],
    out: BinaryIO,
    on_batch: Callable[[list[Any]], None] | None,
) -> int:
    count = 0
    out.write(b"[")
    with open_stream() as raw:
        items = backend.items(raw, "products.item", use_float=True, buf_size=_BUF_SIZE)
        try:
            while batch := list(itertools.islice(items, BATCH)):
                data = canonical(batch)  # "[p1,p2,...]": one call per batch, not per product
                if count:
                    out.write(b",")
                out.write(memoryview(data)[1:-1])
                count += len(batch)
                if on_batch is not None:
                    on_batch(batch)
        except ijson.common.JSONError as exc:
            # Pass 1 read the same bytes without error: the file changed under us.
            raise DocumentError(f"document changed while being read: {_short(exc)}") from None
    out.write(b"]")
    return count


# -- validation --------------------------------------------------------------------------------------

_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_dates: dict[str, str] = {}  # dates already checked: a catalog has few distinct ones
_INF = math.inf


def _date(value: Any, what: str) -> str:
    """An ISO calendar date ``YYYY-MM-DD`` (the only form; 3.11's fromisoformat takes more)."""
    if type(value) is str and _DATE_RE.match(value):
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            pass
        else:
            if len(_dates) < 100_000:
                _dates[value] = value
            return value
    raise DocumentError(f"{what} must be a date YYYY-MM-DD, not {value!r}")


def gtin14(code: Any) -> str:
    """``gtin.normalize(code)`` with a fast path for plain 8/12/13/14-digit codes.

    A million catalog GTINs go through here; the general function costs ~3.5 µs each, this one
    well under 1 µs. Anything unusual (whitespace, wrong length, bad check digit) takes the
    general path, so results and errors are exactly those of ``normalize``.
    """
    if type(code) is str and len(code) in (8, 12, 13, 14) and code.isascii() and code.isdigit():
        b = code.zfill(14).encode("ascii")
        total = 3 * (sum(b[0:13:2]) - 48 * 7) + (sum(b[1:13:2]) - 48 * 6)
        if (10 - total % 10) % 10 == b[13] - 48:
            return b.decode("ascii")
    return normalize(code)


def product_row(item: Any) -> tuple[str, str, str, str, str, str, str, float, float]:
    """The SQLite row of one product; DocumentError naming the problem if it is not valid.

    Runs a million times per snapshot, hence the plain code: no helper calls on the good path.
    """
    if type(item) is not dict:
        raise DocumentError("a product is a JSON object")
    try:
        code = item["gtin"]
        name = item["name"]
        producer = item["producer"]
        origin = item["origin"]
        cert_id = item["cert_id"]
        valid_from = item["valid_from"]
        valid_until = item["valid_until"]
        weight = item["unit_weight_g"]
        tolerance = item["weight_tolerance_g"]
    except KeyError as exc:
        raise DocumentError(f"product {item.get('gtin')!r} has no {exc.args[0]}") from None
    try:
        gtin = gtin14(code)
    except GtinError as exc:
        raise DocumentError(f"product gtin {code!r}: {exc}") from None
    if type(name) is not str or not name or type(cert_id) is not str or not cert_id:
        raise DocumentError(f"product {gtin}: name and cert_id must be non-empty strings")
    if type(producer) is not str or type(origin) is not str:
        raise DocumentError(f"product {gtin}: producer and origin must be strings")
    if type(valid_from) is not str or valid_from not in _dates:
        valid_from = _date(valid_from, f"product {gtin} valid_from")
    if type(valid_until) is not str or valid_until not in _dates:
        valid_until = _date(valid_until, f"product {gtin} valid_until")
    if valid_until < valid_from:
        raise DocumentError(f"product {gtin}: valid_until {valid_until} is before valid_from {valid_from}")
    if (type(weight) is not float and type(weight) is not int) or not 0 < weight < _INF:
        raise DocumentError(f"product {gtin}: unit_weight_g must be a number > 0, not {weight!r}")
    if (type(tolerance) is not float and type(tolerance) is not int) or not 0 <= tolerance < _INF:
        raise DocumentError(f"product {gtin}: weight_tolerance_g must be a number >= 0, not {tolerance!r}")
    return (gtin, name, producer, origin, cert_id, valid_from, valid_until, float(weight), float(tolerance))


def parse_version(values: dict[str, Any]) -> tuple[int | None, int | None, str | None]:
    """``(version, base_version, problem)`` from the top-level members, without raising.

    The version numbers decide stale / same / base_mismatch, so they are read on their own;
    ``problem`` is set when either is missing or not a non-negative integer.
    """
    version = values.get("version")
    base = values.get("base_version", ...)
    if type(version) is not int or version < 0:
        return None, None, f"version must be an integer >= 0, not {version!r}"
    if base is ...:
        # A delta without base_version read as a snapshot would wipe the catalog: refuse it.
        return version, None, "base_version is missing (null for a snapshot)"
    if base is not None and (type(base) is not int or base < 0):
        return version, None, f"base_version must be null or an integer >= 0, not {base!r}"
    return version, base, None


def parse_header(skeleton: Skeleton) -> Header:
    """The validated header; DocumentError if anything but the products is wrong."""
    values = skeleton.values
    version, base, problem = parse_version(values)
    if problem is not None or version is None:
        raise DocumentError(problem or "version missing")
    issued_at = values.get("issued_at")
    if type(issued_at) is not str:
        raise DocumentError(f"issued_at must be an RFC 3339 timestamp, not {issued_at!r}")
    try:
        parse_ts(issued_at)
    except ValueError:
        raise DocumentError(f"issued_at must be an RFC 3339 timestamp, not {issued_at!r}") from None
    if not skeleton.products_streamed:
        raise DocumentError("products must be an array" if "products" in values else "products is missing")
    # revoked may be left out (nothing revoked); when present it is an array of GTINs.
    raw_revoked = values.get("revoked", [])
    if type(raw_revoked) is not list:
        raise DocumentError("revoked must be an array of GTINs")
    revoked: dict[str, None] = {}
    for code in raw_revoked:
        try:
            revoked[gtin14(code)] = None
        except GtinError as exc:
            raise DocumentError(f"revoked gtin {code!r}: {exc}") from None
    return Header(version, base, issued_at, tuple(revoked))
