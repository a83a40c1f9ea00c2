"""Numbered schema migrations of the ledger and the catalog cache, on real SQLite files."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import CatalogStoreError, LedgerError, StoreError
from agent.store.catalog import CatalogStore
from agent.store.ledger import Ledger
from agent.store.schema import CATALOG, CATALOG_V1_TABLES, LEDGER, LEDGER_V1_TABLES, PRODUCTS_DDL, Schema

AT = "2026-11-29T08:15:02.123Z"
KEY = Ed25519PrivateKey.generate().public_key()

# What the code before numbered migrations ran on every open, copied verbatim: the files it
# made are in the field and must keep opening.
LEGACY_LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS records (
    seq  INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    at   TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
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
    ended_at     REAL
);
CREATE INDEX IF NOT EXISTS sessions_active ON sessions(state) WHERE state != 'ended';
CREATE TABLE IF NOT EXISTS idle_reports (code TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen_commands (id TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS lanes (
    lane        TEXT PRIMARY KEY,
    gtin        TEXT,
    price_cents INTEGER,
    product     TEXT,
    tare_g      REAL NOT NULL DEFAULT 0,
    factor      REAL NOT NULL DEFAULT 1
);
INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '1');
"""
LEGACY_CATALOG_DDL = """
CREATE TABLE catalog_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER,
    issued_at TEXT,
    installed_at TEXT,
    product_count INTEGER NOT NULL DEFAULT 0,
    delta INTEGER NOT NULL DEFAULT 0,
    doc_sha256 TEXT);
INSERT INTO catalog_meta (id) VALUES (1);
CREATE TABLE products (
    gtin TEXT NOT NULL,
    name TEXT NOT NULL,
    producer TEXT NOT NULL,
    origin TEXT NOT NULL,
    cert_id TEXT NOT NULL,
    valid_from TEXT NOT NULL,
    valid_until TEXT NOT NULL,
    unit_weight_g REAL NOT NULL,
    weight_tolerance_g REAL NOT NULL);
CREATE UNIQUE INDEX products_gtin ON products (gtin);
CREATE TABLE revoked (gtin TEXT PRIMARY KEY) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


def sql(path: Path, script: str, *, wal: bool = False) -> None:
    conn = sqlite3.connect(path)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(script)
        conn.commit()
    finally:
        conn.close()


def pragmas(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return (conn.execute("PRAGMA application_id").fetchone()[0], conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def open_ledger(path: Path, readonly: bool = False) -> None:
    Ledger(path, readonly=readonly).close()


def open_catalog(path: Path) -> None:
    CatalogStore(path, KEY).close()


OPENERS: dict[str, tuple[Callable[[Path], None], type[StoreError]]] = {
    "ledger": (open_ledger, LedgerError),
    "ledger-readonly": (lambda p: open_ledger(p, readonly=True), LedgerError),
    "catalog": (open_catalog, CatalogStoreError),
}


# -- fresh files -----------------------------------------------------------------------------------
def test_fresh_ledger_gets_every_migration_and_is_marked_ours(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    led = Ledger(path)
    led.append("event", {"kind": "agent_started"}, AT)
    led.close()
    assert pragmas(path) == (LEDGER.application_id, LEDGER.version)
    assert tables(path) == set(LEDGER_V1_TABLES)
    led = Ledger(path)  # a second open finds it current and keeps the record
    assert led.last_seq == 1 and led.meta("schema_version") == "1"
    led.close()


def test_fresh_catalog_gets_every_migration_and_is_marked_ours(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    store = CatalogStore(path, KEY)
    assert store.version is None and store.product_count == 0
    store.close()
    assert pragmas(path) == (CATALOG.application_id, CATALOG.version)
    assert tables(path) == set(CATALOG_V1_TABLES)


# -- files made before migrations were numbered ------------------------------------------------------
def test_ledger_made_by_the_code_before_migrations_opens_with_its_records(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    sql(path, LEGACY_LEDGER_DDL, wal=True)
    led = Ledger(path)
    rec = led.append("event", {"kind": "agent_started"}, AT)
    led.close()
    assert pragmas(path) == (LEDGER.application_id, 1)

    # A second legacy file, read only (cabinetctl sales with the daemon stopped): read, not changed.
    ro_path = tmp_path / "ro" / "ledger.db"
    ro_path.parent.mkdir()
    sql(ro_path, LEGACY_LEDGER_DDL, wal=True)
    sql(ro_path, f"INSERT INTO records VALUES (1, 'event', '{AT}', '{rec.prev}', '{rec.hash}', "
                 "'{\"kind\":\"agent_started\"}')")
    before = ro_path.read_bytes()
    ro = Ledger(ro_path, readonly=True)
    assert ro.last_seq == 1 and ro.verify() == (None, "1 records verified")
    ro.close()
    assert ro_path.read_bytes() == before and pragmas(ro_path) == (0, 0)


def test_catalog_made_by_the_code_before_migrations_opens(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    sql(path, LEGACY_CATALOG_DDL, wal=True)
    sql(path, "UPDATE catalog_meta SET version = 7, product_count = 0 WHERE id = 1")
    store = CatalogStore(path, KEY)
    assert store.version == 7
    store.close()
    assert pragmas(path) == (CATALOG.application_id, 1)


# -- refused, and left exactly as they are --------------------------------------------------------------
def _future_ledger(path: Path) -> None:
    open_ledger(path)
    sql(path, f"PRAGMA user_version = {LEDGER.version + 1}")


def _future_catalog(path: Path) -> None:
    open_catalog(path)
    sql(path, f"PRAGMA user_version = {CATALOG.version + 1}")


def _foreign_tables(path: Path) -> None:
    sql(path, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'a')")


def _foreign_application(path: Path) -> None:
    # Our very tables and a plausible version, but another application's id: still not ours.
    sql(path, LEGACY_LEDGER_DDL + LEGACY_CATALOG_DDL + "PRAGMA application_id = 305419896;")


REFUSED: dict[str, tuple[Callable[[Path], None], tuple[str, ...], str]] = {
    "future-ledger": (_future_ledger, ("ledger", "ledger-readonly"), "newer than this agent knows"),
    "future-catalog": (_future_catalog, ("catalog",), "newer than this agent knows"),
    "foreign-tables": (_foreign_tables, ("ledger", "ledger-readonly", "catalog"), "tables: users"),
    "foreign-application": (_foreign_application, ("ledger", "ledger-readonly", "catalog"),
                            "another application (application_id 0x12345678)"),
}


@pytest.mark.parametrize(("case", "opener"), [(c, o) for c, (_, openers, _) in REFUSED.items() for o in openers])
def test_a_database_that_is_not_ours_or_too_new_is_refused_untouched(tmp_path: Path, case: str, opener: str) -> None:
    make, _, why = REFUSED[case]
    open_, error = OPENERS[opener]
    path = tmp_path / "db.sqlite"
    make(path)
    before = path.read_bytes()
    with pytest.raises(error) as info:
        open_(path)
    message = str(info.value)
    assert why in message and str(path) in message and "\n" not in message, message
    assert "left as it is" in message
    assert path.read_bytes() == before
    # Nothing but SQLite's own companions of a WAL file (a reader may leave those): no journal.
    assert {p.name for p in tmp_path.iterdir()} - {"db.sqlite-wal", "db.sqlite-shm"} == {"db.sqlite"}


def test_an_empty_file_is_not_a_ledger_for_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"")
    with pytest.raises(LedgerError, match="it is empty, not a ledger database"):
        Ledger(path, readonly=True)
    assert path.read_bytes() == b""


# -- the migration machinery -------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [LEDGER, CATALOG], ids=lambda s: s.name)
def test_migrations_are_numbered_from_1_without_gaps(schema: Schema) -> None:
    versions = [version for version, _ in schema.migrations]
    assert versions == list(range(1, len(versions) + 1))
    assert schema.version == versions[-1]
    assert all(statements for _, statements in schema.migrations)


@pytest.mark.parametrize("versions", [[1, 3], [2], [1, 1], [2, 1]])
def test_a_migration_list_with_a_gap_is_refused(versions: list[int]) -> None:
    with pytest.raises(ValueError, match="without gaps"):
        _schema([(v, ("SELECT 1",)) for v in versions])


def _schema(migrations: list[tuple[int, tuple[str, ...]]]) -> Schema:
    return Schema("test database", 0x54455354, tuple(migrations), LedgerError, lambda conn: False)


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


V1: tuple[int, tuple[str, ...]] = (1, ("CREATE TABLE a (x INTEGER)", "INSERT INTO a VALUES (1)"))


def test_missing_migrations_run_in_order_and_only_once(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    conn = _connect(path)
    assert _schema([V1]).migrate(conn, path) == 0
    v3 = _schema([V1, (2, ("ALTER TABLE a ADD COLUMN y INTEGER DEFAULT 2",)),
                  (3, ("UPDATE a SET y = y * 10 + x",))])
    assert v3.migrate(conn, path) == 1
    assert v3.migrate(conn, path) == 3  # current: nothing runs again
    assert conn.execute("SELECT x, y FROM a").fetchall() == [(1, 21)]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()


def test_a_failing_migration_leaves_the_database_at_its_old_version(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    conn = _connect(path)
    _schema([V1]).migrate(conn, path)
    broken = _schema([V1, (2, ("CREATE TABLE b (y INTEGER)", "INSERT INTO nowhere VALUES (1)"))])
    with pytest.raises(LedgerError, match="no such table: nowhere"):
        broken.migrate(conn, path)
    assert not conn.in_transaction
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master")} == {"a"}
    conn.close()


def test_products_template_matches_the_migrated_products_table(tmp_path: Path) -> None:
    """A snapshot install renames a table built from PRODUCTS_DDL into place of ``products``."""
    path = tmp_path / "catalog.db"
    open_catalog(path)
    conn = sqlite3.connect(path)
    try:
        conn.execute(PRODUCTS_DDL.format(name="products_new"))

        def columns(table: str) -> list[tuple[Any, ...]]:
            return [row[1:] for row in conn.execute(f"PRAGMA table_info({table})")]

        assert columns("products_new") == columns("products")
    finally:
        conn.close()
