"""The tamper-evident ledger: every sale and event as a hash-chained record in SQLite.

The ledger is the source of truth (design.md): a record is committed (WAL,
``synchronous=FULL``) before anyone is told about it, and it is marked synced only by the
platform's cumulative ack, kept as one watermark (``acked_upto``) so that an ack of 100,000
records costs one row write, not 100,000.

``seq`` is gap-free and never reused: it is assigned inside the inserting transaction and,
in case someone restores an older copy of the database, a high-water mark ``ledger.hwm``
beside it remembers the last seq and hash ever committed; numbering and the chain continue
from there and the alarm ``ledger_corrupt`` is raised.

The same database holds the session journal (operations.md, sessions rule 1 and 6), the
command ids seen (replay protection across restarts) and the lane planogram, so that a
sale and the journal row closing its session commit in one transaction. Its tables are the
numbered migrations ``agent.store.schema.LEDGER``, checked and applied at every open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import LedgerError
from agent.protocol import ZERO_HASH, canonical, record_hash
from agent.store.readonly import ReadOnlyDatabase, ReadOnlyOpenError
from agent.store.schema import LEDGER

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Record:
    seq: int
    type: str
    at: str
    prev: str
    hash: str
    body: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "at": self.at, "prev": self.prev, "hash": self.hash,
                "body": self.body}


def wire_json(seq: int, type_: str, at: str, prev: str, hash_: str, body_json: str) -> str:
    """A record as it travels in a batch, built from stored text without re-parsing the body."""
    return (
        f'{{"seq":{seq},"type":{json.dumps(type_)},"at":{json.dumps(at)},'
        f'"prev":"{prev}","hash":"{hash_}","body":{body_json}}}'
    )


class Ledger:
    """One SQLite connection, owned by the core thread (the only writer)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.hwm_path = self.path.with_suffix(".hwm")
        self.readonly = readonly
        self.rolled_back = False
        self._ro: ReadOnlyDatabase | None = None
        self._lock = threading.RLock()
        self._conn = self._open()
        self._last_seq, self._last_hash = self._load_tip()
        self._acked = self._acked_stored = min(int(self.meta("acked_upto", "0") or 0), self._last_seq)

    # -- opening ---------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            return self._open_readonly()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.DatabaseError as exc:
            raise self._refused(exc) from exc
        try:
            # Refuse a file that is not a ledger of ours before anything writes to it: never
            # delete, recreate or alter a ledger we cannot read (operations.md, Files).
            LEDGER.version_of(conn, self.path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise LedgerError(f"ledger {self.path} fails its integrity check: {check}")
            LEDGER.migrate(conn, self.path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._refused(exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_readonly(self) -> sqlite3.Connection:
        """For the operator's tools: never writes, and works for a user who can only read
        data_dir, daemon running or stopped (agent.store.readonly)."""
        try:
            self._ro = ReadOnlyDatabase(self.path)
        except ReadOnlyOpenError as exc:
            raise LedgerError(f"cannot read the ledger: {exc}") from exc
        conn = self._ro.conn
        try:
            LEDGER.check(conn, self.path)
        except BaseException:
            self._ro.close()
            raise
        return conn

    def _refused(self, exc: Exception) -> LedgerError:
        return LedgerError(f"cannot open ledger {self.path}: {exc}; refusing to start (the file is left as it is)")

    def _load_tip(self) -> tuple[int, str]:
        row = self._conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        seq, last_hash = (row[0], row[1]) if row else (0, ZERO_HASH)
        hwm = self._read_hwm()
        if hwm is not None and hwm[0] > seq:
            log.error(
                "ledger %s ends at seq %d but seq %d was committed before: the database was rolled back "
                "or restored; continuing the chain from seq %d",
                self.path, seq, hwm[0], hwm[0] + 1,
            )
            self.rolled_back = True
            return hwm
        return seq, last_hash

    def _read_hwm(self) -> tuple[int, str] | None:
        try:
            data = json.loads(self.hwm_path.read_text())
            return int(data["seq"]), str(data["hash"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("ignoring unreadable %s: %s", self.hwm_path, exc)
            return None

    def _write_hwm(self) -> None:
        tmp = self.hwm_path.with_suffix(".hwm.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(json.dumps({"seq": self._last_seq, "hash": self._last_hash}))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.hwm_path)
        except OSError as exc:
            log.warning("cannot update %s: %s", self.hwm_path, exc)

    def close(self) -> None:
        with self._lock:
            if not self.readonly:
                self.flush_acked()
            self._conn.close()
            if self._ro is not None:
                self._ro.close()

    # -- transactions ----------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One durable transaction: records appended and journal rows changed commit together."""
        with self._lock:
            tx = Tx(self)
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                yield tx
                self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                self._last_seq, self._last_hash = tx.start_tip
                raise
            if tx.appended:
                self._write_hwm()

    def append(self, type_: str, body: dict[str, Any], at: str) -> Record:
        with self.transaction() as tx:
            return tx.append(type_, body, at)

    # -- reads -----------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def last_hash(self) -> str:
        return self._last_hash

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, params)

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def acked_upto(self) -> int:
        return self._acked

    def set_acked(self, upto: int) -> bool:
        """Move the ack watermark forward (never back); True when it moved.

        Kept in memory and written by ``flush_acked`` (the core does so every second and at
        exit): an ack lost to a power cut only makes records be sent again, which the
        platform deduplicates, while an fsync per ack would cap the drain of a backlog.
        """
        upto = min(upto, self._last_seq)
        if upto <= self._acked:
            return False
        self._acked = upto
        return True

    def flush_acked(self) -> None:
        if self._acked != self._acked_stored:
            with self.transaction() as tx:
                tx.set_meta("acked_upto", str(self._acked))
            self._acked_stored = self._acked

    @property
    def unsynced(self) -> int:
        return max(0, self._last_seq - self.acked_upto)

    def batch_from(self, first_seq: int, max_records: int, max_bytes: int) -> tuple[list[str], int]:
        """Wire JSON of consecutive records from ``first_seq``; returns (records, last seq in it)."""
        rows = self.execute(
            "SELECT seq, type, at, prev, hash, body FROM records WHERE seq >= ? ORDER BY seq LIMIT ?",
            (first_seq, max_records),
        ).fetchall()
        out: list[str] = []
        size = 0
        last = first_seq - 1
        for seq, type_, at, prev, hash_, body in rows:
            if seq != last + 1 and out:
                break  # a hole (pruned or rolled back): stop the batch, batches are consecutive
            text = wire_json(seq, type_, at, prev, hash_, body)
            if out and size + len(text.encode()) + 1 > max_bytes:
                break
            out.append(text)
            size += len(text.encode()) + 1
            last = seq
        return out, last

    def first_seq_from(self, seq: int) -> int | None:
        row = self.execute("SELECT min(seq) FROM records WHERE seq >= ?", (seq,)).fetchone()
        return row[0] if row and row[0] is not None else None

    def records(self, *, since_at: str | None = None, newest_first: bool = True, from_seq: int = 1) -> Iterator[Record]:
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT seq, type, at, prev, hash, body FROM records WHERE seq >= ? AND at >= ? ORDER BY seq {order}"
        cur = self._conn.cursor()
        cur.execute(sql, (from_seq, since_at or ""))
        while True:
            rows = cur.fetchmany(500)
            if not rows:
                return
            for seq, type_, at, prev, hash_, body in rows:
                yield Record(seq, type_, at, prev, hash_, json.loads(body))

    def verify(self) -> tuple[int | None, str]:
        """Recompute the chain; (None, summary) when intact, else (first bad seq, why)."""
        prev_seq: int | None = None
        prev_hash = ZERO_HASH
        count = 0
        for rec in self.records(newest_first=False):
            if prev_seq is None:
                if rec.seq != 1:
                    prev_hash = rec.prev  # pruned head: the chain is checked from the first kept record
            elif rec.seq != prev_seq + 1:
                return rec.seq, f"gap: seq {prev_seq} is followed by {rec.seq}"
            if rec.prev != prev_hash:
                return rec.seq, f"seq {rec.seq}: prev does not match the hash of seq {rec.seq - 1}"
            if record_hash(rec.seq, rec.type, rec.at, rec.prev, rec.body) != rec.hash:
                return rec.seq, f"seq {rec.seq}: hash does not match its content"
            prev_seq, prev_hash = rec.seq, rec.hash
            count += 1
        hwm = self._read_hwm()
        last = prev_seq or 0
        if hwm is not None and hwm[0] > last:
            return last + 1, (f"records {last + 1}..{hwm[0]} were committed before but are missing "
                              f"(deleted, or the database was rolled back)")
        if hwm is not None and hwm[0] == last and last and hwm[1] != prev_hash:
            return last, f"seq {last} is not the record that was committed (its hash differs from the high-water mark)"
        return None, f"{count} records verified"

    def prune_synced(self, before_at: str) -> int:
        """Delete synced records older than ``before_at`` (retain_synced_days); never an unsynced one."""
        with self.transaction():
            cur = self._conn.execute(
                "DELETE FROM records WHERE seq <= ? AND at < ? AND seq < ?",
                (self.acked_upto, before_at, self._last_seq),
            )
        return cur.rowcount

    # -- session journal -------------------------------------------------------------------
    def active_sessions(self) -> list[dict[str, Any]]:
        cur = self.execute("SELECT * FROM sessions WHERE state != 'ended' ORDER BY unlock_at")
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            item = dict(zip(names, row, strict=True))
            item["baseline"] = json.loads(item["baseline"])
            item["scans"] = json.loads(item["scans"])
            out.append(item)
        return out

    def idle_report_due(self, code: str, now: float, every_s: float) -> bool:
        """True (and remembered) when ``code`` was not reported in the last ``every_s`` seconds."""
        row = self.execute("SELECT at FROM idle_reports WHERE code = ?", (code,)).fetchone()
        if row is not None and 0 <= now - row[0] < every_s:
            return False
        with self.transaction():
            self._conn.execute("DELETE FROM idle_reports WHERE at < ?", (now - every_s,))
            self._conn.execute("INSERT OR REPLACE INTO idle_reports(code, at) VALUES (?, ?)", (code, now))
        return True

    def command_seen(self, command_id: str) -> bool:
        return self.execute("SELECT 1 FROM seen_commands WHERE id = ?", (command_id,)).fetchone() is not None

    # -- lanes (planogram, tare, calibration) ------------------------------------------------
    def lane_rows(self) -> dict[str, dict[str, Any]]:
        cur = self.execute("SELECT lane, gtin, price_cents, product, tare_g, factor FROM lanes")
        return {
            r[0]: {"gtin": r[1], "price_cents": r[2], "product": json.loads(r[3]) if r[3] else None,
                   "tare_g": r[4], "factor": r[5]}
            for r in cur.fetchall()
        }


class Tx:
    """The writes of one ledger transaction (only valid inside ``Ledger.transaction``)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._conn = ledger._conn
        self.start_tip = (ledger._last_seq, ledger._last_hash)
        self.appended: list[Record] = []

    def append(self, type_: str, body: dict[str, Any], at: str) -> Record:
        led = self._ledger
        seq = led._last_seq + 1
        prev = led._last_hash
        body_json = canonical(body).decode("utf-8")
        digest = record_hash(seq, type_, at, prev, body)
        self._conn.execute(
            "INSERT INTO records(seq, type, at, prev, hash, body) VALUES (?,?,?,?,?,?)",
            (seq, type_, at, prev, digest, body_json),
        )
        led._last_seq, led._last_hash = seq, digest
        rec = Record(seq, type_, at, prev, digest, body)
        self.appended.append(rec)
        return rec

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def remember_command(self, command_id: str, expires_at: float) -> None:
        self._conn.execute("INSERT OR REPLACE INTO seen_commands(id, expires_at) VALUES (?, ?)",
                           (command_id, expires_at))

    def forget_commands_before(self, epoch: float) -> None:
        self._conn.execute("DELETE FROM seen_commands WHERE expires_at < ?", (epoch,))

    def open_session(self, *, session_id: str, command_id: str | None, door: int, shopper: str, auth: str,
                     baseline: dict[str, float | None], unlock_at: float) -> None:
        self._conn.execute(
            "INSERT INTO sessions(session_id, command_id, door, shopper, auth, baseline, unlock_at, state)"
            " VALUES (?,?,?,?,?,?,?, 'unlocking')",
            (session_id, command_id, door, shopper, auth, json.dumps(baseline), unlock_at),
        )

    def update_session(self, session_id: str, **fields: Any) -> None:
        if "scans" in fields:
            fields["scans"] = json.dumps(fields["scans"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._conn.execute(f"UPDATE sessions SET {cols} WHERE session_id = ?", (*fields.values(), session_id))

    def set_lane(self, lane: str, **fields: Any) -> None:
        self._conn.execute("INSERT OR IGNORE INTO lanes(lane) VALUES (?)", (lane,))
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._conn.execute(f"UPDATE lanes SET {cols} WHERE lane = ?", (*fields.values(), lane))
