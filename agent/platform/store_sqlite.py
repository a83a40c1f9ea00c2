"""The embedded store: one SQLite file (WAL, ``synchronous=FULL``), the default for a pilot.

Several workers may share the file: each transaction starts with ``BEGIN IMMEDIATE``, which
takes the database's write lock, so writers run one after the other (and a commit is on
disk before an ack is sent).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.platform.chain import Rec
from agent.platform.store import Anomaly, CabinetState, Links, StatusUpdate, Store, StoreError, StoreTx
from agent.protocol import ZERO_HASH

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 60_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    cabinet TEXT NOT NULL, seq BIGINT NOT NULL, type TEXT NOT NULL, at TEXT NOT NULL,
    prev TEXT NOT NULL, hash TEXT NOT NULL, body JSON NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY (cabinet, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cabinets (
    cabinet TEXT PRIMARY KEY, acked_upto BIGINT NOT NULL DEFAULT 0, last_status JSON, online BOOLEAN,
    updated_at TEXT,
    acked_hash TEXT NOT NULL DEFAULT '0000000000000000000000000000000000000000000000000000000000000000',
    chain_start BIGINT NOT NULL DEFAULT 1, gap_since REAL, resend_at REAL, status_received_at TEXT,
    status_last_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS anomalies (
    cabinet TEXT NOT NULL, seq BIGINT, kind TEXT NOT NULL, detail TEXT NOT NULL, at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS anomalies_once ON anomalies (cabinet, coalesce(seq, -1), kind, detail);
CREATE INDEX IF NOT EXISTS cabinets_gapped ON cabinets (gap_since) WHERE gap_since IS NOT NULL;
CREATE TABLE IF NOT EXISTS ingest_groups (grp TEXT PRIMARY KEY, busy_at REAL NOT NULL);
"""

_STATE_COLS = "cabinet, acked_upto, acked_hash, chain_start, gap_since, resend_at, online, status_last_seq"


def _state(row: Sequence[Any]) -> CabinetState:
    online = None if row[6] is None else bool(row[6])
    return CabinetState(row[0], row[1], row[2], row[3], row[4], row[5], online, row[7])


class _SqliteTx(StoreTx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def lock(self, cabinets: Sequence[str]) -> dict[str, CabinetState]:
        # BEGIN IMMEDIATE holds the write lock already: read the rows.
        out: dict[str, CabinetState] = {}
        for name in cabinets:
            row = self._conn.execute(f"SELECT {_STATE_COLS} FROM cabinets WHERE cabinet = ?", (name,)).fetchone()
            if row is None:
                raise StoreError(f"cabinet {name!r} has no row (ensure_cabinets first)")
            out[name] = _state(row)
        return out

    def links(self, ranges: Sequence[tuple[str, int, int]]) -> dict[str, Links]:
        out: dict[str, Links] = {}
        for cabinet, lo, hi in ranges:
            found = out.setdefault(cabinet, {})
            for seq, prev, hash_ in self._conn.execute(
                    "SELECT seq, prev, hash FROM records WHERE cabinet = ? AND seq BETWEEN ? AND ?", (cabinet, lo, hi)):
                found[seq] = (prev, hash_)
        return out

    def links_after(self, cabinet: str, after_seq: int, limit: int) -> list[tuple[int, str, str]]:
        return self._conn.execute(
            "SELECT seq, prev, hash FROM records WHERE cabinet = ? AND seq > ? ORDER BY seq LIMIT ?",
            (cabinet, after_seq, limit)).fetchall()

    def insert_records(self, rows: Sequence[tuple[str, Rec]], received_at: str) -> None:
        self._conn.executemany(
            "INSERT INTO records (cabinet, seq, type, at, prev, hash, body, received_at) VALUES (?,?,?,?,?,?,?,?)",
            [(c, r.seq, r.type, r.at, r.prev, r.hash, r.body_json, received_at) for c, r in rows])

    def add_anomalies(self, anomalies: Sequence[Anomaly], at: str) -> None:
        self._conn.executemany(
            "INSERT OR IGNORE INTO anomalies (cabinet, seq, kind, detail, at) VALUES (?,?,?,?,?)",
            [(a.cabinet, a.seq, a.kind, a.detail, at) for a in anomalies])

    def save_states(self, states: Sequence[CabinetState], updated_at: str) -> None:
        self._conn.executemany(
            "UPDATE cabinets SET acked_upto = ?, acked_hash = ?, chain_start = ?, gap_since = ?, status_last_seq = ?,"
            " updated_at = ? WHERE cabinet = ?",
            [(s.acked_upto, s.acked_hash, s.chain_start, s.gap_since, s.announced, updated_at, s.cabinet)
             for s in states])

    def save_statuses(self, updates: Sequence[StatusUpdate]) -> None:
        self._conn.executemany(
            "UPDATE cabinets SET last_status = ?, online = ?, status_received_at = ?, updated_at = ?"
            " WHERE cabinet = ? AND (status_received_at IS NULL OR status_received_at <= ?)",
            [(u.status_json, u.online, u.received_at, u.received_at, u.cabinet, u.received_at) for u in updates])


class SqliteStore(Store):
    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path)
        self._known: set[str] = set()
        if not create and not self.path.exists():
            raise StoreError(f"no database at {self.path}")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._set_up(create)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc

    def _set_up(self, create: bool) -> None:
        """WAL, FULL sync and the schema. Two workers opening one new file at once: switching it to
        WAL and creating the schema under another worker's lock can fail at once with "database is
        locked" (SQLite does not busy-wait there), so that is tried again until the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        delay = 0.005
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
                self._conn.execute("PRAGMA synchronous = FULL")
                if create:
                    # under the write lock from the start: a plain CREATE reads the schema first
                    self._conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
                return
            except sqlite3.OperationalError as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)   # another worker holds the file for a moment
                delay = min(0.2, delay * 2)

    def ensure_cabinets(self, cabinets: Sequence[str]) -> None:
        new = [c for c in cabinets if c not in self._known]
        if not new:
            return
        with self.transaction():
            self._conn.executemany("INSERT OR IGNORE INTO cabinets (cabinet, acked_hash) VALUES (?, ?)",
                                   [(c, ZERO_HASH) for c in new])
        self._known.update(new)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot begin: {exc}") from exc
        try:
            yield _SqliteTx(self._conn)
            self._conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{self.path}: {exc}") from exc
            raise

    def gapped(self) -> list[CabinetState]:
        rows = self._query(f"SELECT {_STATE_COLS} FROM cabinets WHERE gap_since IS NOT NULL ORDER BY cabinet")
        return [_state(r) for r in rows]

    def claim_resend(self, cabinet: str, now: float, every_s: float) -> bool:
        try:
            cur = self._conn.execute(
                "UPDATE cabinets SET resend_at = ? WHERE cabinet = ? AND (resend_at IS NULL OR resend_at <= ?)",
                (now, cabinet, now - every_s))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        return cur.rowcount == 1

    def mark_busy(self, group: str, at: float) -> None:
        try:
            self._conn.execute("INSERT INTO ingest_groups (grp, busy_at) VALUES (?, ?) ON CONFLICT (grp)"
                               " DO UPDATE SET busy_at = max(busy_at, excluded.busy_at)", (group, at))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def busy_at(self, group: str) -> float | None:
        rows = self._query("SELECT busy_at FROM ingest_groups WHERE grp = ?", (group,))
        return float(rows[0][0]) if rows else None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    # -- report ------------------------------------------------------------------------------
    def cabinet_rows(self) -> list[dict[str, Any]]:
        rows = self._query("""
            SELECT c.cabinet, c.acked_upto, c.online,
                   count(r.seq), min(r.seq), max(r.seq),
                   coalesce(sum(r.type = 'sale'), 0),
                   coalesce(sum(CASE WHEN r.type = 'sale' THEN json_extract(r.body, '$.total_cents') END), 0),
                   coalesce(sum(r.type = 'sale' AND json_array_length(r.body, '$.flags') > 0), 0),
                   coalesce(sum(r.type = 'event' AND json_extract(r.body, '$.kind') = 'uncertified_scan'), 0)
            FROM cabinets c LEFT JOIN records r ON r.cabinet = c.cabinet
            GROUP BY c.cabinet ORDER BY c.cabinet""")
        return [{"cabinet": r[0], "acked_upto": r[1], "online": None if r[2] is None else bool(r[2]),
                 "records": r[3], "first_seq": r[4], "last_seq": r[5], "sales": r[6], "sales_cents": r[7],
                 "flagged_sales": r[8], "uncertified_scans": r[9]} for r in rows]

    def gap_rows(self) -> list[tuple[str, int, int]]:
        rows = self._query("""
            SELECT cabinet, before + 1, seq - 1 FROM (
                SELECT cabinet, seq, lag(seq) OVER (PARTITION BY cabinet ORDER BY seq) AS before FROM records)
            WHERE before IS NOT NULL AND seq > before + 1 ORDER BY cabinet, seq""")
        return [(r[0], r[1], r[2]) for r in rows]

    def product_rows(self) -> list[dict[str, Any]]:
        rows = self._query("""
            SELECT json_extract(i.value, '$.gtin') AS gtin, max(json_extract(i.value, '$.name')),
                   sum(json_extract(i.value, '$.qty')),
                   sum(json_extract(i.value, '$.qty') * json_extract(i.value, '$.unit_price_cents'))
            FROM records r, json_each(r.body, '$.items') i
            WHERE r.type = 'sale' AND gtin IS NOT NULL GROUP BY gtin ORDER BY gtin""")
        return [{"gtin": r[0], "name": r[1], "units": r[2] or 0, "cents": r[3] or 0} for r in rows]

    def anomaly_rows(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT cabinet, seq, kind, detail, at FROM anomalies ORDER BY rowid")
        return [{"cabinet": r[0], "seq": r[1], "kind": r[2], "detail": r[3], "at": r[4]} for r in rows]

    def close(self) -> None:
        self._conn.close()
