"""The cabinet's cached certified catalog (mqtt.md, Catalog documents): install and lookups.

The catalog lives in its own SQLite file (``{data_dir}/catalog.db``, WAL) so that a national
snapshot never competes with the ledger for locks or fsyncs. Its tables are the numbered
migrations ``agent.store.schema.CATALOG``, checked and applied at every open.

Atomicity: every install is ONE SQLite write transaction. Nothing is staged before the Ed25519
signature has verified (a forged document never writes a row): pass 2 keeps the validated rows
in an unnamed file, and once the signature holds they are appended to a staging table; the same
transaction then drops the old table, builds the unique GTIN index and renames the staging table
into place (a delta upserts from the staging table instead), updates the metadata row and COMMITs.
Until COMMIT nothing is durable: a SIGKILL or power cut at any point leaves WAL frames without a
commit record, which SQLite ignores on the next open, so the old catalog stays whole and no
staging state survives to trouble the next install (``DROP TABLE IF EXISTS products_new`` is
only a belt to those braces). Readers on other connections keep their WAL snapshot: they see
the old catalog until COMMIT and the new one after it, never a mix (each read is one statement).
We did not build a new database file and ``os.replace`` it: SQLite ties the ``-wal``/``-shm``
files to the path, so swapping the main file under open connections (our reader threads,
``cabinetctl`` processes) can pair a new database with an old WAL, the classic way to corrupt
SQLite, and every reader would have to notice the swap and reopen.

Scale: a 1,000,000-product snapshot (~230 MB) is never held as Python objects. ``catalog_doc``
reads it in two streaming passes, rebuilds its canonical bytes into an unnamed temporary file
(O_TMPFILE, so a crash leaves nothing behind) and keeps the validated product rows in another;
the canonical file is then mmapped for ``Ed25519PublicKey.verify`` (pure Ed25519 hashes the
whole message in one call), and the rows are staged in batches.
That mapping is the RSS peak: about 35 MiB of interpreter plus the canonical size, ~270 MiB for
a million products; the page cache and the heap freed by the passes are handed back to the OS
just before it. Staging appends to a plain rowid table and the unique
index is built once at the end (a sort), which is several times faster than random inserts
into a B-tree. A document byte-identical to the installed one (the retained snapshot arrives on
every reconnect) is recognised by its SHA-256 and answered ``same_version`` without parsing.

Refusals, in the order they are decided: ``invalid`` if the bytes are not one JSON object or
repeat a top-level key (nothing can be verified); ``bad_signature`` if ``sig`` is missing or does not verify over the
canonical bytes (so a forged document is reported as forged whatever else is wrong with it);
``invalid`` if version or base_version are missing or not integers; then ``stale``,
``same_version`` (not an error) and ``base_mismatch`` against the installed version; last
``invalid`` for any other problem (issued_at, revoked, a product: missing fields, a GTIN with a
bad check digit, bad dates, a GTIN listed twice). A delta without ``base_version`` is invalid,
never read as a snapshot, which would wipe the catalog. A GTIN both listed and revoked by one
document ends up revoked.

Disk: while a snapshot installs, the file holds the old and the new table (freed pages are
reused by the next install), the WAL grows to the size of the transaction (truncated after the
checkpoint), and the canonical copy needs about the document's size.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import dataclasses
import datetime as dt
import hashlib
import io
import logging
import marshal
import mmap
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
import weakref
import zoneinfo
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import CatalogError, CatalogStoreError, GtinError, SignatureError
from agent.protocol import format_ts, verify_bytes
from agent.store.catalog_doc import (
    CountingReader,
    DocumentError,
    Header,
    Skeleton,
    gtin14,
    parse_header,
    parse_version,
    product_row,
    read_skeleton,
    write_canonical,
)
from agent.store.schema import CATALOG, PRODUCTS_DDL
from drivers.gs1 import BAD_CHECK_DIGIT, InvalidGtin, normalize

log = logging.getLogger(__name__)

# Page cache of the install connection. Staging only appends, so a small cache costs nothing,
# and what SQLite has allocated it does not give back before the mmap, the RSS peak; the index
# build after the signature check (a sort) gets a bigger one.
_STAGE_CACHE_KIB = 2000
_SWAP_CACHE_KIB = 16000

INSTALLED = "installed"
SAME_VERSION = "same_version"

_COLUMNS = "gtin, name, producer, origin, cert_id, valid_from, valid_until, unit_weight_g, weight_tolerance_g"
_META_SQL = "SELECT version, issued_at, installed_at, product_count, delta, doc_sha256 FROM catalog_meta WHERE id = 1"
# One statement, hence one read snapshot: the product and its revoked flag come from the same catalog.
_LOOKUP_SQL = (
    "SELECT p.name, p.producer, p.origin, p.cert_id, p.valid_from, p.valid_until, p.unit_weight_g,"
    " p.weight_tolerance_g, EXISTS (SELECT 1 FROM revoked WHERE gtin = ?1)"
    " FROM (SELECT 1) LEFT JOIN products AS p ON p.gtin = ?1"
)
_PRODUCT_SQL = (
    "SELECT name, producer, origin, cert_id, valid_from, valid_until, unit_weight_g, weight_tolerance_g"
    " FROM products WHERE gtin = ?"
)
_UPSERT_SQL = (
    f"INSERT INTO products ({_COLUMNS}) SELECT {_COLUMNS} FROM products_new WHERE true"
    " ON CONFLICT (gtin) DO UPDATE SET name = excluded.name, producer = excluded.producer,"
    " origin = excluded.origin, cert_id = excluded.cert_id, valid_from = excluded.valid_from,"
    " valid_until = excluded.valid_until, unit_weight_g = excluded.unit_weight_g,"
    " weight_tolerance_g = excluded.weight_tolerance_g"
)


@dataclasses.dataclass(frozen=True)
class Product:
    gtin: str
    name: str
    producer: str
    origin: str
    cert_id: str
    valid_from: dt.date
    valid_until: dt.date
    unit_weight_g: float
    weight_tolerance_g: float

    def as_dict(self) -> dict[str, Any]:
        """The product as a catalog document lists it: mqtt.md's field names, dates YYYY-MM-DD,
        the GTIN as its GTIN-14 (for JSON answers and the lane snapshot in the ledger)."""
        return {
            "gtin": self.gtin, "name": self.name, "producer": self.producer, "origin": self.origin,
            "cert_id": self.cert_id, "valid_from": self.valid_from.isoformat(),
            "valid_until": self.valid_until.isoformat(), "unit_weight_g": self.unit_weight_g,
            "weight_tolerance_g": self.weight_tolerance_g,
        }


@dataclasses.dataclass(frozen=True)
class Lookup:
    """Whether a code is certified at a time, and if not why (the ``uncertified_scan`` reasons).

    ``reason`` is None when certified, else ``unknown`` (not in the catalog, or not a GTIN at all:
    wrong length or not digits, e.g. a QR payload), ``revoked``, ``not_yet_valid``, ``expired``
    or ``bad_check_digit`` (a well-formed GTIN whose check digit is wrong). ``gtin`` is the GTIN-14
    whenever the code is a valid GTIN; ``product`` is set when the catalog has it (also when its
    certificate is not valid at that time).
    """

    certified: bool
    reason: str | None
    gtin: str | None
    product: Product | None


@dataclasses.dataclass(frozen=True)
class InstallResult:
    outcome: str  # "installed" | "same_version"
    version: int
    products: int  # products in the catalog after the install
    delta: bool


@dataclasses.dataclass(frozen=True)
class _Meta:
    version: int | None
    issued_at: str | None
    installed_at: str | None
    product_count: int
    delta: bool
    doc_sha256: str | None


class _Reader:
    """A reader thread's connection; closed when the thread (and so its threading.local) goes."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class _Rows:
    """The product rows of a document, validated as pass 2 reads it and kept in an unnamed file
    (marshal: fast, and only ever read back by us) until the signature has verified; only then
    are they staged. The rows come from the very objects whose canonical bytes were verified.

    The first invalid product stops the collection (the install will be refused) but not the
    pass: the canonical bytes are still needed to tell a forged document (bad_signature) from a
    signed but invalid one.
    """

    def __init__(self, directory: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".catalog-rows-")
        self.problem: str | None = None
        self.count = 0

    def add(self, batch: list[Any]) -> None:
        if self.problem is not None:
            return
        try:
            rows = [product_row(item) for item in batch]
        except DocumentError as exc:
            self.problem = str(exc)
            return
        data = marshal.dumps(rows)  # whole batches: marshal.load on a file reads in tiny pieces
        self._file.write(len(data).to_bytes(8, "little"))
        self._file.write(data)
        self.count += len(rows)

    def batches(self) -> Iterator[list[Any]]:
        self._file.flush()
        self._file.seek(0)
        while head := self._file.read(8):
            yield marshal.loads(self._file.read(int.from_bytes(head, "little")))

    def close(self) -> None:
        self._file.close()


class _Stager:
    """Appends verified rows to ``products_new``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.rows = 0

    def add(self, rows: list[Any]) -> None:
        self._conn.executemany(f"INSERT INTO products_new ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", rows)
        self.rows += len(rows)


class CatalogStore:
    """The installed catalog: one installer thread may install while any thread reads.

    Each reading thread gets its own connection (``threading.local``); an install uses a
    connection of its own for its single write transaction. Installs are serialised by a lock.
    """

    def __init__(self, path: Path | str, public_key: Ed25519PublicKey, timezone: str = "UTC") -> None:
        self._path = Path(path)
        self._key = public_key
        self._tz = zoneinfo.ZoneInfo(timezone)
        self._local = threading.local()
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._readers_lock = threading.Lock()
        self._install_lock = threading.Lock()
        self._closed = False
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    # -- connections -----------------------------------------------------------------------------
    def _connect(self, timeout_s: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        return conn

    def _init_schema(self) -> None:
        """Check the file and migrate it; CatalogStoreError (one line) when it cannot be used."""
        try:
            conn = self._connect(30.0)
        except sqlite3.DatabaseError as exc:
            raise CatalogStoreError(f"cannot open catalog cache {self._path}: {exc}") from exc
        try:
            # Read first: a foreign file is refused before it is touched, and a current one
            # opens without the write lock, which an install may be holding.
            CATALOG.version_of(conn, self._path)
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            CATALOG.migrate(conn, self._path)
        except sqlite3.DatabaseError as exc:
            raise CatalogStoreError(f"cannot open catalog cache {self._path}: {exc}") from exc
        finally:
            conn.close()

    def _reader(self) -> sqlite3.Connection:
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            if self._closed:
                raise CatalogStoreError("the catalog store is closed")
            conn = self._connect(5.0)
            conn.execute("PRAGMA query_only = ON")
            reader = _Reader(conn)
            weakref.finalize(reader, conn.close)
            with self._readers_lock:
                self._readers.add(reader)
            self._local.reader = reader
        return reader.conn

    def close(self) -> None:
        """Close every reader connection (call once the other threads stopped using the store)."""
        self._closed = True
        with self._readers_lock:
            readers = list(self._readers)
            self._readers.clear()
        for reader in readers:
            reader.conn.close()
        self._local = threading.local()

    # -- reads -----------------------------------------------------------------------------------
    def _meta(self, conn: sqlite3.Connection | None = None) -> _Meta:
        rows = (conn or self._reader()).execute(_META_SQL).fetchall()
        version, issued_at, installed_at, count, delta, sha = rows[0]
        return _Meta(version, issued_at, installed_at, count, bool(delta), sha)

    @property
    def version(self) -> int | None:
        return self._meta().version

    @property
    def issued_at(self) -> str | None:
        return self._meta().issued_at

    @property
    def installed_at(self) -> str | None:
        return self._meta().installed_at

    @property
    def product_count(self) -> int:
        return self._meta().product_count

    def info(self) -> dict[str, Any]:
        """For ``cabinetctl catalog [--json]``: one consistent snapshot of the metadata."""
        meta = self._meta()
        return {"version": meta.version, "issued_at": meta.issued_at, "installed_at": meta.installed_at,
                "products": meta.product_count}

    def product(self, gtin: str) -> Product | None:
        """The catalog entry of a GTIN (any valid 8/12/13/14-digit form), or None."""
        try:
            g = gtin14(gtin)
        except GtinError:
            return None
        rows = self._reader().execute(_PRODUCT_SQL, (g,)).fetchall()
        return _product(g, rows[0]) if rows else None

    def lookup(self, code: str, at: dt.datetime, symbology: str | None = None) -> Lookup:
        """Is ``code`` certified at ``at`` (an aware datetime)? Dates are local to the cabinet.

        The certificate dates are calendar dates in the cabinet's time zone, so ``at`` is turned
        into its local date first: 2026-12-31T20:00Z is still 2026-12-31 in UTC but already
        2027-01-01 in Asia/Shanghai.
        """
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("lookup needs an aware datetime")
        try:
            gtin = normalize(code, symbology) if symbology else gtin14(code)
        except InvalidGtin as exc:
            reason = "bad_check_digit" if exc.reason == BAD_CHECK_DIGIT else "unknown"
            return Lookup(False, reason, None, None)
        row = self._reader().execute(_LOOKUP_SQL, (gtin,)).fetchall()[0]
        if row[0] is None:
            return Lookup(False, "revoked" if row[8] else "unknown", gtin, None)
        product = _product(gtin, row)
        day = at.astimezone(self._tz).date()
        if day < product.valid_from:
            return Lookup(False, "not_yet_valid", gtin, product)
        if day > product.valid_until:
            return Lookup(False, "expired", gtin, product)
        return Lookup(True, None, gtin, product)

    # -- installs --------------------------------------------------------------------------------
    def install_bytes(self, data: bytes) -> InstallResult:
        """Install a document received over MQTT; CatalogError if it is refused."""
        sha = hashlib.sha256(data).hexdigest()
        return self._install(lambda: io.BytesIO(data), len(data), None, sha)

    def install_stream(self, open_stream: Callable[[], BinaryIO], size: int) -> InstallResult:
        """Install a document the caller can open as often as needed (an MQTT message spooled to a
        file: ``agent.mqtt_payload.Document.open``); each call must return a new reader from the start."""
        with open_stream() as f:
            sha = _sha256_stream(f)
        return self._install(open_stream, size, None, sha)

    def install_file(
        self, path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None
    ) -> InstallResult:
        """Install a document from a file (USB stick, ``cabinetctl catalog install``).

        ``progress(done, total)`` counts the bytes read by the two streaming passes, so ``total``
        is twice the file size; it is called from this thread, inside the install.
        """
        path = os.fspath(path)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode):
                sha = _sha256_stream(f)
                return self._install(lambda: open(path, "rb"), st.st_size, progress, sha)
            # A pipe or a device cannot be read twice: spool it to a file next to the catalog.
            with tempfile.TemporaryFile(dir=self._path.parent, prefix=".catalog-spool-") as spool:
                shutil.copyfileobj(f, spool, 1 << 20)
                spool.seek(0)
                sha = _sha256_stream(spool)
                size = spool.tell()
                return self._install(lambda: _reopen(spool), size, progress, sha)

    def _install(
        self,
        open_raw: Callable[[], BinaryIO],
        size: int,
        progress: Callable[[int, int], None] | None,
        sha: str,
    ) -> InstallResult:
        with self._install_lock:
            if self._closed:
                raise CatalogStoreError("the catalog store is closed")
            meta = self._meta()
            if meta.version is not None and meta.doc_sha256 == sha:
                log.debug("catalog document identical to installed version %d", meta.version)
                return InstallResult(SAME_VERSION, meta.version, meta.product_count, meta.delta)
            return _Install(self, open_raw, size, progress, sha).run()


class _Install:
    """One install attempt: the passes, the decision and the swap, in one write transaction."""

    def __init__(
        self,
        store: CatalogStore,
        open_raw: Callable[[], BinaryIO],
        size: int,
        progress: Callable[[int, int], None] | None,
        sha: str,
    ) -> None:
        self.store = store
        self.open_raw = open_raw
        self.total = 2 * size
        self.done = 0
        self.progress = progress
        self.sha = sha

    def _on_read(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def _open(self) -> _ClosingReader:
        return _ClosingReader(self.open_raw(), self._on_read)

    def run(self) -> InstallResult:
        t0 = time.monotonic()
        try:
            skeleton = read_skeleton(self._open)
        except DocumentError as exc:
            raise CatalogError("invalid", str(exc)) from None
        hint = skeleton.values.get("version")
        hint = hint if type(hint) is int else None
        sig = _signature(skeleton.values.get("sig"), hint)
        t1 = time.monotonic()

        conn = self.store._connect(30.0)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA cache_size = -{_STAGE_CACHE_KIB}")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("BEGIN IMMEDIATE")  # the installed version cannot change under us from here
            return self._in_transaction(conn, skeleton, sig, hint, t0, t1)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    def _in_transaction(
        self, conn: sqlite3.Connection, skeleton: Skeleton, sig: bytes, hint: int | None, t0: float, t1: float
    ) -> InstallResult:
        meta = self.store._meta(conn)
        installed = meta.version
        version, base, problem = parse_version(skeleton.values)
        header: Header | None = None
        if problem is not None or version is None:
            decision = "invalid"
        elif installed is not None and version < installed:
            decision = "stale"
        elif installed is not None and version == installed:
            decision = SAME_VERSION
        elif base is not None and base != installed:
            decision = "base_mismatch"
        else:
            try:
                header = parse_header(skeleton)
                decision = INSTALLED
            except DocumentError as exc:
                decision, problem = "invalid", str(exc)

        rows = _Rows(self.store._path.parent)
        try:
            with tempfile.TemporaryFile(dir=self.store._path.parent, prefix=".catalog-canonical-") as canon:
                try:
                    count = write_canonical(skeleton, self._open, canon, rows.add if decision == INSTALLED else None)
                except DocumentError as exc:
                    raise CatalogError("invalid", str(exc), hint) from None
                canon.flush()
                t2 = time.monotonic()
                # The mapping below is the peak of RSS (it holds the whole canonical document):
                # hand the page cache and the freed batches back to the OS first.
                conn.execute("PRAGMA shrink_memory")
                _release_free_memory()
                with mmap.mmap(canon.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)
                    try:
                        verify_bytes(view, sig, self.store._key)
                    except SignatureError as exc:
                        raise CatalogError("bad_signature", str(exc), hint) from None
                    finally:
                        view.release()
            t3 = time.monotonic()

            if decision == "invalid":
                raise CatalogError("invalid", problem or "invalid document", hint)
            assert version is not None
            if decision == "stale":
                raise CatalogError("stale", f"version {version} is older than the installed {installed}", version)
            if decision == SAME_VERSION:
                return InstallResult(SAME_VERSION, version, meta.product_count, base is not None)
            if decision == "base_mismatch":
                raise CatalogError(
                    "base_mismatch", f"delta on version {base}, installed version is {installed}", version
                )
            assert header is not None
            if rows.problem is not None:
                raise CatalogError("invalid", rows.problem, version)
            # Verified: only now is anything staged (a forged document never writes a row).
            conn.execute("DROP TABLE IF EXISTS products_new")
            conn.execute(PRODUCTS_DDL.format(name="products_new"))
            stager = _Stager(conn)
            for batch in rows.batches():
                stager.add(batch)
        finally:
            rows.close()
        t3b = time.monotonic()
        conn.execute(f"PRAGMA cache_size = -{_SWAP_CACHE_KIB}")
        try:
            if header.base_version is None:
                self._swap_snapshot(conn, header)
            else:
                self._apply_delta(conn, header)
        except DocumentError as exc:
            raise CatalogError("invalid", str(exc), version) from None
        products = conn.execute("SELECT count(*) FROM products").fetchone()[0]
        conn.execute(
            "UPDATE catalog_meta SET version = ?, issued_at = ?, installed_at = ?, product_count = ?,"
            " delta = ?, doc_sha256 = ? WHERE id = 1",
            (version, header.issued_at, format_ts(dt.datetime.now(dt.timezone.utc)), products,
             int(base is not None), self.sha),
        )
        conn.execute("COMMIT")
        t4 = time.monotonic()
        try:
            # Shrink the WAL the install grew; readers are short, so waiting 1 s is plenty.
            conn.execute("PRAGMA busy_timeout = 1000")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:  # a long reader: the next checkpoint will do it
            log.info("catalog WAL checkpoint postponed: %s", exc)
        t5 = time.monotonic()
        log.info(
            "installed catalog version %d (%s, %d products, %d in document): read %.1fs, canonical %.1fs,"
            " verify %.1fs, stage %.1fs, swap+commit %.1fs, checkpoint %.1fs",
            version, "delta" if base is not None else "snapshot", products, count,
            t1 - t0, t2 - t1, t3 - t2, t3b - t3, t4 - t3b, t5 - t4,
        )
        if self.progress is not None:
            self.progress(self.total, self.total)
        return InstallResult(INSTALLED, version, products, base is not None)

    @staticmethod
    def _check_unique(conn: sqlite3.Connection, index: str, table: str) -> None:
        try:
            conn.execute(f"CREATE UNIQUE INDEX {index} ON {table} (gtin)")
        except sqlite3.IntegrityError:
            dup = conn.execute(f"SELECT gtin FROM {table} GROUP BY gtin HAVING count(*) > 1 LIMIT 1").fetchone()
            raise DocumentError(f"product {dup[0] if dup else '?'} appears more than once") from None

    def _swap_snapshot(self, conn: sqlite3.Connection, header: Header) -> None:
        conn.execute("DROP TABLE products")  # and its index, whose name the new one takes
        self._check_unique(conn, "products_gtin", "products_new")
        conn.execute("ALTER TABLE products_new RENAME TO products")
        conn.execute("DELETE FROM revoked")
        self._revoke(conn, header.revoked)

    def _apply_delta(self, conn: sqlite3.Connection, header: Header) -> None:
        self._check_unique(conn, "products_new_gtin", "products_new")
        conn.execute(_UPSERT_SQL)
        conn.execute("DELETE FROM revoked WHERE gtin IN (SELECT gtin FROM products_new)")  # re-added
        conn.execute("DROP TABLE products_new")
        self._revoke(conn, header.revoked)

    @staticmethod
    def _revoke(conn: sqlite3.Connection, revoked: tuple[str, ...]) -> None:
        """Revoked wins over a listing in the same document: the safe reading of a contradiction."""
        rows = [(g,) for g in revoked]
        conn.executemany("DELETE FROM products WHERE gtin = ?", rows)
        conn.executemany("INSERT OR IGNORE INTO revoked (gtin) VALUES (?)", rows)


class _ClosingReader(CountingReader):
    """A CountingReader that is its own context manager and closes the stream it wraps."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None]) -> None:
        super().__init__(raw, on_read)
        self._owned = raw

    def __enter__(self) -> _ClosingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._owned.close()


def _signature(value: Any, hint: int | None) -> bytes:
    if not isinstance(value, str):
        raise CatalogError("bad_signature", "missing sig", hint)
    try:
        sig = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CatalogError("bad_signature", "sig is not base64", hint) from None
    if len(sig) != 64:
        raise CatalogError("bad_signature", f"sig has {len(sig)} bytes, an Ed25519 signature 64", hint)
    return sig


def _product(gtin: str, row: tuple[Any, ...]) -> Product:
    return Product(gtin, row[0], row[1], row[2], row[3], dt.date.fromisoformat(row[4]),
                   dt.date.fromisoformat(row[5]), row[6], row[7])


def _release_free_memory() -> None:
    """Ask glibc to return freed heap pages to the OS (it keeps them otherwise); no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _reopen(f: BinaryIO) -> BinaryIO:
    """A new file object at offset 0 over an open (possibly unnamed) file; the passes run one by one."""
    dup = os.fdopen(os.dup(f.fileno()), "rb")
    dup.seek(0)
    return dup
