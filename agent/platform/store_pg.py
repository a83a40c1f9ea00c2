"""The scale-out store: PostgreSQL through psycopg 3.

Workers on several machines share one database. A transaction locks the rows of the
cabinets it touches (``SELECT ... FOR UPDATE``, in sorted order so that two workers never
deadlock); under that lock the records it checked as absent stay absent, so they go in by
``COPY``, the fastest path PostgreSQL has, while the primary key on ``(cabinet, seq)``
still guarantees that nothing is ever stored twice. ``synchronous_commit`` is left on: a
commit is on disk before any ack is sent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

import psycopg

from agent.platform.chain import Rec
from agent.platform.store import Anomaly, CabinetState, Links, StatusUpdate, Store, StoreError, StoreTx
from agent.protocol import ZERO_HASH

log = logging.getLogger(__name__)

SCHEMA_LOCK = 0x6361625F706C74   # pg_advisory_lock key: concurrent CREATE ... IF NOT EXISTS can collide
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    cabinet TEXT NOT NULL, seq BIGINT NOT NULL, type TEXT NOT NULL, at TEXT NOT NULL,
    prev TEXT NOT NULL, hash TEXT NOT NULL, body JSON NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY (cabinet, seq)
);
CREATE TABLE IF NOT EXISTS cabinets (
    cabinet TEXT PRIMARY KEY, acked_upto BIGINT NOT NULL DEFAULT 0, last_status JSON, online BOOLEAN,
    updated_at TEXT,
    acked_hash TEXT NOT NULL DEFAULT '0000000000000000000000000000000000000000000000000000000000000000',
    chain_start BIGINT NOT NULL DEFAULT 1, gap_since DOUBLE PRECISION, resend_at DOUBLE PRECISION,
    status_received_at TEXT, status_last_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS anomalies (
    id BIGSERIAL PRIMARY KEY, cabinet TEXT NOT NULL, seq BIGINT, kind TEXT NOT NULL, detail TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS anomalies_once ON anomalies (cabinet, coalesce(seq, -1), kind, detail);
CREATE INDEX IF NOT EXISTS cabinets_gapped ON cabinets (gap_since) WHERE gap_since IS NOT NULL;
CREATE TABLE IF NOT EXISTS ingest_groups (grp TEXT PRIMARY KEY, busy_at DOUBLE PRECISION NOT NULL);
"""

_STATE_COLS = "cabinet, acked_upto, acked_hash, chain_start, gap_since, resend_at, online, status_last_seq"
_NUM = "CASE WHEN json_typeof({0}) = 'number' THEN ({1})::numeric ELSE 0 END"


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field(text: str) -> str:
    """A text field in COPY's text format (a cabinet id and the hash are safe by construction; the
    body is canonical JSON, whose only special character there is the backslash)."""
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.translate(_COPY_ESCAPES)
    return text


def _copy_json(text: str) -> str:
    """Canonical JSON in COPY's text format: it has no raw tab or newline, so only backslashes double."""
    return text.replace("\\", "\\\\") if "\\" in text else text


def _state(row: Sequence[Any]) -> CabinetState:
    return CabinetState(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7])


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, Decimal)) else 0


class _PgTx(StoreTx):
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def lock(self, cabinets: Sequence[str]) -> dict[str, CabinetState]:
        rows = self._conn.execute(
            f"SELECT {_STATE_COLS} FROM cabinets WHERE cabinet = ANY(%s) ORDER BY cabinet FOR UPDATE",
            (list(cabinets),)).fetchall()
        out = {r[0]: _state(r) for r in rows}
        missing = set(cabinets) - out.keys()
        if missing:
            raise StoreError(f"cabinets without a row (ensure_cabinets first): {sorted(missing)[:5]}")
        return out

    def links(self, ranges: Sequence[tuple[str, int, int]]) -> dict[str, Links]:
        out: dict[str, Links] = {c: {} for c, _, _ in ranges}
        if not ranges:
            return out
        rows = self._conn.execute(
            "SELECT r.cabinet, r.seq, r.prev, r.hash"
            " FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS q(cabinet, lo, hi)"
            " JOIN records r ON r.cabinet = q.cabinet AND r.seq BETWEEN q.lo AND q.hi",
            ([c for c, _, _ in ranges], [lo for _, lo, _ in ranges], [hi for _, _, hi in ranges])).fetchall()
        for cabinet, seq, prev, hash_ in rows:
            out[cabinet][seq] = (prev, hash_)
        return out

    def links_after(self, cabinet: str, after_seq: int, limit: int) -> list[tuple[int, str, str]]:
        rows = self._conn.execute(
            "SELECT seq, prev, hash FROM records WHERE cabinet = %s AND seq > %s ORDER BY seq LIMIT %s",
            (cabinet, after_seq, limit)).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def insert_records(self, rows: Sequence[tuple[str, Rec]], received_at: str) -> None:
        if not rows:
            return
        # COPY's text format, written as one block: a fifth of the cost of write_row per row. Built
        # plain first: when the fields hold no tab, newline or CR (counted, which is all that ever
        # happens: canonical JSON escapes them and the other fields are short words), the only escape
        # left is doubling every backslash; otherwise each field is escaped alone.
        tail = f"\t{received_at}\n"
        text = "".join([f"{cabinet}\t{r.seq}\t{r.type}\t{r.at}\t{r.prev}\t{r.hash}\t{r.body_json}{tail}"
                        for cabinet, r in rows])
        if text.count("\t") != 7 * len(rows) or text.count("\n") != len(rows) or "\r" in text:
            text = "".join(
                f"{cabinet}\t{r.seq}\t{_copy_field(r.type)}\t{_copy_field(r.at)}\t{_copy_field(r.prev)}\t{r.hash}"
                f"\t{_copy_json(r.body_json)}{tail}"
                for cabinet, r in rows)
        elif "\\" in text:
            text = text.replace("\\", "\\\\")
        with self._conn.cursor() as cur:
            with cur.copy("COPY records (cabinet, seq, type, at, prev, hash, body, received_at) FROM STDIN") as copy:
                copy.write(text)

    def add_anomalies(self, anomalies: Sequence[Anomaly], at: str) -> None:
        if not anomalies:
            return
        with self._conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO anomalies (cabinet, seq, kind, detail, at) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                [(a.cabinet, a.seq, a.kind, a.detail, at) for a in anomalies])

    def save_states(self, states: Sequence[CabinetState], updated_at: str) -> None:
        if not states:
            return
        # one statement for every cabinet of the flush (an UPDATE per cabinet costs the server more)
        self._conn.execute(
            "UPDATE cabinets AS c SET acked_upto = u.acked_upto, acked_hash = u.acked_hash,"
            " chain_start = u.chain_start, gap_since = u.gap_since, status_last_seq = u.announced, updated_at = %s"
            " FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::float8[], %s::bigint[])"
            " AS u(cabinet, acked_upto, acked_hash, chain_start, gap_since, announced) WHERE c.cabinet = u.cabinet",
            (updated_at, [s.cabinet for s in states], [s.acked_upto for s in states], [s.acked_hash for s in states],
             [s.chain_start for s in states], [s.gap_since for s in states], [s.announced for s in states]))

    def save_statuses(self, updates: Sequence[StatusUpdate]) -> None:
        if not updates:
            return
        with self._conn.cursor() as cur:
            cur.executemany(
                "UPDATE cabinets SET last_status = %s, online = %s, status_received_at = %s, updated_at = %s"
                " WHERE cabinet = %s AND (status_received_at IS NULL OR status_received_at <= %s)",
                [(u.status_json, u.online, u.received_at, u.received_at, u.cabinet, u.received_at) for u in updates])


class PgStore(Store):
    def __init__(self, dsn: str, *, create: bool = True) -> None:
        self.dsn = dsn
        self._known: set[str] = set()
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {_redacted(dsn)}: {exc}") from exc
        if create:
            try:
                self._conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
                try:
                    self._conn.execute(SCHEMA)
                finally:
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
            except psycopg.Error as exc:
                raise StoreError(f"cannot create the tables in {_redacted(dsn)}: {exc}") from exc

    def ensure_cabinets(self, cabinets: Sequence[str]) -> None:
        new = sorted(c for c in cabinets if c not in self._known)
        if not new:
            return
        try:
            self._conn.execute(
                "INSERT INTO cabinets (cabinet, acked_hash) SELECT c, %s FROM unnest(%s::text[]) AS c ORDER BY c"
                " ON CONFLICT DO NOTHING", (ZERO_HASH, new))
        except psycopg.Error as exc:
            raise StoreError(f"creating cabinet rows: {exc}") from exc
        self._known.update(new)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        try:
            with self._conn.transaction():
                yield _PgTx(self._conn)
        except psycopg.Error as exc:
            raise StoreError(str(exc).strip()) from exc

    def gapped(self) -> list[CabinetState]:
        rows = self._query(f"SELECT {_STATE_COLS} FROM cabinets WHERE gap_since IS NOT NULL ORDER BY cabinet")
        return [_state(r) for r in rows]

    def claim_resend(self, cabinet: str, now: float, every_s: float) -> bool:
        try:
            cur = self._conn.execute(
                "UPDATE cabinets SET resend_at = %s WHERE cabinet = %s AND (resend_at IS NULL OR resend_at <= %s)",
                (now, cabinet, now - every_s))
        except psycopg.Error as exc:
            raise StoreError(str(exc).strip()) from exc
        return cur.rowcount == 1

    def mark_busy(self, group: str, at: float) -> None:
        try:
            self._conn.execute("INSERT INTO ingest_groups (grp, busy_at) VALUES (%s, %s) ON CONFLICT (grp)"
                               " DO UPDATE SET busy_at = greatest(ingest_groups.busy_at, excluded.busy_at)",
                               (group, at))
        except psycopg.Error as exc:
            raise StoreError(str(exc).strip()) from exc

    def busy_at(self, group: str) -> float | None:
        rows = self._query("SELECT busy_at FROM ingest_groups WHERE grp = %s", (group,))
        return float(rows[0][0]) if rows else None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise StoreError(str(exc).strip()) from exc

    # -- report ------------------------------------------------------------------------------
    def cabinet_rows(self) -> list[dict[str, Any]]:
        flags = "r.body->'flags'"
        rows = self._query(f"""
            SELECT c.cabinet, c.acked_upto, c.online, count(r.seq), min(r.seq), max(r.seq),
                   count(*) FILTER (WHERE r.type = 'sale'),
                   coalesce(sum({_NUM.format("r.body->'total_cents'", "r.body->>'total_cents'")})
                            FILTER (WHERE r.type = 'sale'), 0),
                   count(*) FILTER (WHERE r.type = 'sale' AND
                       CASE WHEN json_typeof({flags}) = 'array' THEN json_array_length({flags}) ELSE 0 END > 0),
                   count(*) FILTER (WHERE r.type = 'event' AND r.body->>'kind' = 'uncertified_scan')
            FROM cabinets c LEFT JOIN records r ON r.cabinet = c.cabinet
            GROUP BY c.cabinet ORDER BY c.cabinet""")
        return [{"cabinet": r[0], "acked_upto": r[1], "online": r[2], "records": r[3], "first_seq": r[4],
                 "last_seq": r[5], "sales": r[6], "sales_cents": _int(r[7]), "flagged_sales": r[8],
                 "uncertified_scans": r[9]} for r in rows]

    def gap_rows(self) -> list[tuple[str, int, int]]:
        rows = self._query("""
            SELECT cabinet, before + 1, seq - 1 FROM (
                SELECT cabinet, seq, lag(seq) OVER (PARTITION BY cabinet ORDER BY seq) AS before FROM records) AS w
            WHERE before IS NOT NULL AND seq > before + 1 ORDER BY cabinet, seq""")
        return [(r[0], r[1], r[2]) for r in rows]

    def product_rows(self) -> list[dict[str, Any]]:
        qty = _NUM.format("i->'qty'", "i->>'qty'")
        price = _NUM.format("i->'unit_price_cents'", "i->>'unit_price_cents'")
        rows = self._query(f"""
            SELECT i->>'gtin' AS gtin, max(i->>'name'), sum({qty}), sum({qty} * {price})
            FROM records r,
                 json_array_elements(CASE WHEN json_typeof(r.body->'items') = 'array'
                                          THEN r.body->'items' ELSE '[]'::json END) AS i
            WHERE r.type = 'sale' AND json_typeof(i) = 'object' AND i->>'gtin' IS NOT NULL
            GROUP BY 1 ORDER BY 1""")
        return [{"gtin": r[0], "name": r[1], "units": _int(r[2]), "cents": _int(r[3])} for r in rows]

    def anomaly_rows(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT cabinet, seq, kind, detail, at FROM anomalies ORDER BY id")
        return [{"cabinet": r[0], "seq": r[1], "kind": r[2], "detail": r[3], "at": r[4]} for r in rows]

    def close(self) -> None:
        self._conn.close()


def _redacted(dsn: str) -> str:
    """The DSN without a password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the database"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items())
