"""The schemas of the agent's two SQLite files as numbered migrations, checked at every open.

A database is ours when its ``PRAGMA application_id`` is the one of its kind; its version is
``PRAGMA user_version``. Opening one runs the migrations it lacks, in order, in one
transaction together with the new ``user_version``, so a power cut leaves the old version or
the new one, never half of a migration. A database that is not ours, or whose version is newer
than this code knows, is refused with a one-line error and left exactly as it is: the ledger
is the source of truth, and a downgrade must never be able to alter or lose it.

Files made before migrations were numbered carry no application_id. They are recognised by
what that code left in them (the ledger: its tables and ``meta.schema_version = '1'``; the
catalog cache: its tables and ``user_version = 1``) and get the id on their next writable
open; a read-only open (``cabinetctl sales``) takes them as they are.

A migration, once released, never changes: a cabinet in the field may have any version, and
migration N must do exactly what it did when that cabinet ran it. Add migration N+1 instead.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import CatalogStoreError, LedgerError, StoreError

log = logging.getLogger(__name__)

Migration = tuple[int, tuple[str, ...]]
"""(version, statements): the statements that bring version - 1 to ``version``."""


@dataclass(frozen=True)
class Schema:
    """One kind of database: its name in messages, its application id, its migrations."""

    name: str
    application_id: int
    migrations: tuple[Migration, ...]
    error: type[StoreError]
    is_legacy_v1: Callable[[sqlite3.Connection], bool]
    """Whether a database without our application_id was made by the code before numbered
    migrations (it is then version 1)."""

    def __post_init__(self) -> None:
        versions = [version for version, _ in self.migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"{self.name} migrations must be numbered 1, 2, 3... without gaps, not {versions}")

    @property
    def version(self) -> int:
        """The version this code writes and reads."""
        return self.migrations[-1][0]

    def version_of(self, conn: sqlite3.Connection, path: Path) -> int:
        """The version of the database on ``conn`` (0: empty), only reading it; raises ``error``
        if it is not ours, is newer than this code, or is not a database at all.

        Call it before anything that writes (``PRAGMA journal_mode = WAL`` does), so a file
        that is not ours is refused before it is touched.
        """
        return self._guard(path, lambda: self._found(conn, path))

    def _found(self, conn: sqlite3.Connection, path: Path) -> int:
        app_id = _pragma(conn, "application_id")
        version = _pragma(conn, "user_version")
        if app_id == self.application_id:
            found = version
        elif app_id != 0:
            raise self._refuse(path, f"it belongs to another application (application_id {app_id:#010x})")
        elif not _tables(conn):
            found = 0
        elif self.is_legacy_v1(conn):
            found = 1
        else:
            tables = ", ".join(sorted(_tables(conn))[:6])
            raise self._refuse(path, f"it is not a {self.name} database (tables: {tables})")
        if found > self.version:
            raise self._refuse(path, f"its schema version {found} is newer than this agent knows ({self.version})")
        return found

    def check(self, conn: sqlite3.Connection, path: Path) -> None:
        """For a read-only open: the database must be ours and at this code's version."""
        found = self.version_of(conn, path)
        if found == 0:
            raise self._refuse(path, f"it is empty, not a {self.name} database")
        if found < self.version:
            raise self._refuse(path, f"its schema version {found} is older than this agent's ({self.version}); "
                                     "start the daemon once to migrate it")

    def migrate(self, conn: sqlite3.Connection, path: Path) -> int:
        """Bring the database up to this code's version; returns the version found.

        ``conn`` must be in autocommit mode (``isolation_level=None``). A database already at
        this version is only read, so opening one while another connection holds the write
        lock (an install in progress) does not wait for it.
        """
        return self._guard(path, lambda: self._migrate(conn, path))

    def _migrate(self, conn: sqlite3.Connection, path: Path) -> int:
        found = self._found(conn, path)
        if found == self.version and _pragma(conn, "application_id") == self.application_id:
            return found
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = self._found(conn, path)  # again: another process may have migrated it meanwhile
            for version, statements in self.migrations[found:]:
                for sql in statements:
                    conn.execute(sql)
                log.debug("%s %s: migration %d applied", self.name, path, version)
            conn.execute(f"PRAGMA application_id = {self.application_id}")
            conn.execute(f"PRAGMA user_version = {self.version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if found != self.version:
            log.info("%s %s: schema version %d -> %d", self.name, path, found, self.version)
        return found

    def _guard(self, path: Path, step: Callable[[], int]) -> int:
        try:
            return step()
        except sqlite3.DatabaseError as exc:
            raise self._refuse(path, f"cannot read it: {exc}") from exc

    def _refuse(self, path: Path, why: str) -> StoreError:
        return self.error(f"refusing to open {self.name} {path}: {why} (the file is left as it is)")


def _pragma(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    return {row[0] for row in rows}


# -- the ledger ------------------------------------------------------------------------------------

LEDGER_V1_TABLES = frozenset({"records", "meta", "sessions", "idle_reports", "seen_commands", "lanes"})


def _legacy_ledger(conn: sqlite3.Connection) -> bool:
    if not LEDGER_V1_TABLES <= _tables(conn):
        return False
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return row is not None and row[0] == "1"


LEDGER = Schema(
    name="ledger",
    application_id=0x4341424C,  # "CABL"
    migrations=(
        (1, (
            """CREATE TABLE records (
                seq  INTEGER PRIMARY KEY,
                type TEXT NOT NULL,
                at   TEXT NOT NULL,
                prev TEXT NOT NULL,
                hash TEXT NOT NULL,
                body TEXT NOT NULL)""",
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            """CREATE TABLE sessions (
                session_id   TEXT PRIMARY KEY,
                command_id   TEXT,
                door         INTEGER NOT NULL,
                shopper      TEXT NOT NULL,
                auth         TEXT NOT NULL,
                baseline     TEXT NOT NULL,
                unlock_at    REAL NOT NULL,
                opened_at    REAL,
                closed_at    REAL,
                scans        TEXT NOT NULL DEFAULT '[]',
                state        TEXT NOT NULL,
                ended_at     REAL)""",
            "CREATE INDEX sessions_active ON sessions(state) WHERE state != 'ended'",
            "CREATE TABLE idle_reports (code TEXT PRIMARY KEY, at REAL NOT NULL)",
            "CREATE TABLE seen_commands (id TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
            """CREATE TABLE lanes (
                lane        TEXT PRIMARY KEY,
                gtin        TEXT,
                price_cents INTEGER,
                product     TEXT,
                tare_g      REAL NOT NULL DEFAULT 0,
                factor      REAL NOT NULL DEFAULT 1)""",
            # What the code before numbered migrations wrote: kept so that a ledger made by
            # either looks the same. Frozen at '1'; the version is user_version.
            "INSERT INTO meta(key, value) VALUES ('schema_version', '1')",
        )),
    ),
    error=LedgerError,
    is_legacy_v1=_legacy_ledger,
)


# -- the catalog cache -----------------------------------------------------------------------------

CATALOG_V1_TABLES = frozenset({"catalog_meta", "products", "revoked"})

PRODUCTS_DDL = """CREATE TABLE {name} (
    gtin TEXT NOT NULL,
    name TEXT NOT NULL,
    producer TEXT NOT NULL,
    origin TEXT NOT NULL,
    cert_id TEXT NOT NULL,
    valid_from TEXT NOT NULL,
    valid_until TEXT NOT NULL,
    unit_weight_g REAL NOT NULL,
    weight_tolerance_g REAL NOT NULL)"""
"""The products table as of the latest migration: a snapshot install stages into a table
built from it and renames that into place, so a migration that changes ``products`` must
change this too (tests/component/test_schema.py compares the two)."""


def _legacy_catalog(conn: sqlite3.Connection) -> bool:
    return _pragma(conn, "user_version") == 1 and CATALOG_V1_TABLES <= _tables(conn)


CATALOG = Schema(
    name="catalog cache",
    application_id=0x43414243,  # "CABC"
    migrations=(
        (1, (
            """CREATE TABLE catalog_meta (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                version INTEGER,
                issued_at TEXT,
                installed_at TEXT,
                product_count INTEGER NOT NULL DEFAULT 0,
                delta INTEGER NOT NULL DEFAULT 0,
                doc_sha256 TEXT)""",
            "INSERT INTO catalog_meta (id) VALUES (1)",
            """CREATE TABLE products (
                gtin TEXT NOT NULL,
                name TEXT NOT NULL,
                producer TEXT NOT NULL,
                origin TEXT NOT NULL,
                cert_id TEXT NOT NULL,
                valid_from TEXT NOT NULL,
                valid_until TEXT NOT NULL,
                unit_weight_g REAL NOT NULL,
                weight_tolerance_g REAL NOT NULL)""",
            "CREATE UNIQUE INDEX products_gtin ON products (gtin)",
            "CREATE TABLE revoked (gtin TEXT PRIMARY KEY) WITHOUT ROWID",
        )),
    ),
    error=CatalogStoreError,
    is_legacy_v1=_legacy_catalog,
)
