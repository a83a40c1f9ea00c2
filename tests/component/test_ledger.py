"""The hash-chained SQLite ledger (mqtt.md Records; operations.md Files, sessions rules 1 and 6)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.errors import LedgerError
from agent.store.ledger import ZERO_HASH, Ledger

AT = "2026-11-29T08:15:02.123Z"


def ts(i: int) -> str:
    return f"2026-11-{1 + i // 86400 % 28:02d}T00:00:{i % 60:02d}.000Z"


def expected_hash(seq: int, type_: str, at: str, prev: str, body: Any) -> str:
    """Computed here from mqtt.md, independently of the agent's code."""
    doc = {"seq": seq, "type": type_, "at": at, "prev": prev, "body": body}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ledger.db"


@pytest.fixture
def ledger(path: Path):
    led = Ledger(path)
    yield led
    try:
        led.close()
    except sqlite3.ProgrammingError:  # already closed by the test
        pass


def fill(led: Ledger, n: int, body: dict[str, Any] | None = None) -> list:
    return [led.append("event", {"kind": "test", "i": led.last_seq + 1, **(body or {})}, ts(led.last_seq + 1))
            for _ in range(n)]


def raw_rows(path: Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT seq, type, at, prev, hash, body FROM records ORDER BY seq").fetchall()
    finally:
        conn.close()


def edit(path: Path, sql: str, params: tuple = ()) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


# -- the chain -------------------------------------------------------------------------------------------
def test_first_record_seq_1_prev_zeros(ledger: Ledger) -> None:
    assert ledger.last_seq == 0 and ledger.last_hash == ZERO_HASH == "0" * 64
    rec = ledger.append("event", {"kind": "agent_started", "version": "0.3.0"}, AT)
    assert rec.seq == 1
    assert rec.prev == "0" * 64
    assert rec.hash == expected_hash(1, "event", AT, "0" * 64, {"kind": "agent_started", "version": "0.3.0"})
    assert ledger.last_seq == 1 and ledger.last_hash == rec.hash


def test_hash_chain_is_computed_as_in_the_contract(ledger: Ledger, path: Path) -> None:
    bodies = [
        {"kind": "door_forced", "door": 1},
        {"sale_id": "s", "items": [{"name": "香菇 Dried shiitake", "qty": 2, "weight_g": -501.2}], "total_cents": 3180,
         "flags": []},
        {"nested": {"z": 1, "a": [1, 2.5, None, True]}, "ünïcode": "ü€"},
    ]
    types = ["event", "sale", "event"]
    recs = [ledger.append(t, b, AT) for t, b in zip(types, bodies, strict=True)]
    prev = "0" * 64
    for seq, (rec, t, b) in enumerate(zip(recs, types, bodies, strict=True), start=1):
        assert rec.seq == seq and rec.prev == prev
        assert rec.hash == expected_hash(seq, t, AT, prev, b)
        assert rec.body == b
        prev = rec.hash
    # what is stored is the same, and the body is stored as canonical JSON
    rows = raw_rows(path)
    assert [r[0] for r in rows] == [1, 2, 3]
    for row, rec in zip(rows, recs, strict=True):
        assert row[3] == rec.prev and row[4] == rec.hash
        assert row[5] == json.dumps(rec.body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert ledger.verify() == (None, "3 records verified")


def test_records_read_back(ledger: Ledger) -> None:
    recs = fill(ledger, 5)
    assert [r.seq for r in ledger.records()] == [5, 4, 3, 2, 1]
    assert list(ledger.records(newest_first=False)) == recs
    assert [r.seq for r in ledger.records(newest_first=False, from_seq=4)] == [4, 5]
    assert recs[0].wire() == {"seq": 1, "type": "event", "at": recs[0].at, "prev": ZERO_HASH, "hash": recs[0].hash,
                              "body": recs[0].body}


def test_seq_gap_free_across_close_and_reopen(path: Path) -> None:
    led = Ledger(path)
    fill(led, 3)
    tip = led.last_hash
    led.close()
    led = Ledger(path)
    assert led.last_seq == 3 and led.last_hash == tip and not led.rolled_back
    rec = led.append("event", {"kind": "x"}, AT)
    assert rec.seq == 4 and rec.prev == tip
    led.close()
    assert [r[0] for r in raw_rows(path)] == [1, 2, 3, 4]
    led = Ledger(path)
    assert led.verify()[0] is None
    led.close()


def test_failing_transaction_leaves_no_record_and_consumes_no_seq(ledger: Ledger, path: Path) -> None:
    fill(ledger, 2)
    tip_seq, tip_hash = ledger.last_seq, ledger.last_hash
    hwm_before = ledger.hwm_path.read_text()
    with pytest.raises(RuntimeError, match="boom"):
        with ledger.transaction() as tx:
            tx.append("event", {"kind": "a"}, AT)
            tx.append("event", {"kind": "b"}, AT)
            tx.open_session(session_id="s1", command_id="c1", door=1, shopper="x", auth="qr",
                            baseline={"A1": 1.0}, unlock_at=1.0)
            raise RuntimeError("boom")
    assert ledger.last_seq == tip_seq and ledger.last_hash == tip_hash
    assert [r[0] for r in raw_rows(path)] == [1, 2]
    assert ledger.active_sessions() == []
    assert ledger.hwm_path.read_text() == hwm_before
    rec = ledger.append("event", {"kind": "c"}, AT)
    assert rec.seq == 3 and rec.prev == tip_hash
    assert ledger.verify()[0] is None


def test_transaction_commits_records_and_journal_together(ledger: Ledger) -> None:
    with ledger.transaction() as tx:
        tx.open_session(session_id="s1", command_id="c1", door=1, shopper="x", auth="qr",
                        baseline={"A1": 1.0}, unlock_at=1.0)
        r1 = tx.append("event", {"kind": "a"}, AT)
        r2 = tx.append("event", {"kind": "b"}, AT)
    assert (r1.seq, r2.seq) == (1, 2) and r2.prev == r1.hash
    assert [s["session_id"] for s in ledger.active_sessions()] == ["s1"]


# -- verify ------------------------------------------------------------------------------------------------
def _five_then_close(path: Path) -> None:
    led = Ledger(path)
    fill(led, 5)
    led.close()


def test_verify_detects_tampered_body(path: Path) -> None:
    _five_then_close(path)
    edit(path, "UPDATE records SET body = ? WHERE seq = 3", (json.dumps({"kind": "test", "i": 999}),))
    led = Ledger(path)
    bad, why = led.verify()
    assert bad == 3 and "hash" in why
    led.close()


def test_verify_detects_tampered_prev(path: Path) -> None:
    _five_then_close(path)
    edit(path, "UPDATE records SET prev = ? WHERE seq = 4", ("f" * 64,))
    led = Ledger(path)
    bad, why = led.verify()
    assert bad == 4 and "prev" in why
    led.close()


def test_verify_detects_rehashed_record(path: Path) -> None:
    """Rewriting a body and its own hash still breaks the next record's prev."""
    _five_then_close(path)
    rows = raw_rows(path)
    seq, type_, at, prev, _h, _body = rows[1]
    body = {"kind": "test", "i": 12345}
    edit(path, "UPDATE records SET body = ?, hash = ? WHERE seq = 2",
         (json.dumps(body), expected_hash(seq, type_, at, prev, body)))
    led = Ledger(path)
    assert led.verify()[0] == 3
    led.close()


def test_verify_detects_deleted_middle_record(path: Path) -> None:
    _five_then_close(path)
    edit(path, "DELETE FROM records WHERE seq = 3")
    led = Ledger(path)
    bad, why = led.verify()
    assert bad == 4 and "gap" in why
    led.close()


def test_verify_intact_after_reopen(path: Path) -> None:
    _five_then_close(path)
    led = Ledger(path)
    assert led.verify() == (None, "5 records verified")
    led.close()


# -- rollback detection -----------------------------------------------------------------------------------
def _db_files(path: Path) -> list[Path]:
    return [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


def test_restored_older_copy_is_detected_and_numbering_continues(path: Path, tmp_path: Path) -> None:
    led = Ledger(path)
    fill(led, 3)
    led.close()
    saved = tmp_path / "saved"
    saved.mkdir()
    for f in _db_files(path):
        shutil.copy2(f, saved / f.name)

    led = Ledger(path)
    assert not led.rolled_back
    newer = fill(led, 2)
    last_hash_ever = newer[-1].hash
    assert led.last_seq == 5
    led.close()

    for f in _db_files(path):
        f.unlink()
    for f in saved.iterdir():
        shutil.copy2(f, path.parent / f.name)
    assert [r[0] for r in raw_rows(path)] == [1, 2, 3]

    led = Ledger(path)
    assert led.rolled_back is True
    assert led.last_seq == 5 and led.last_hash == last_hash_ever
    rec = led.append("event", {"kind": "agent_started"}, AT)
    assert rec.seq == 6
    assert rec.prev == last_hash_ever
    assert rec.hash == expected_hash(6, "event", AT, last_hash_ever, {"kind": "agent_started"})
    bad, why = led.verify()
    assert bad == 6 and "gap" in why  # seq 3 followed by 6: visible to verify
    led.close()

    led = Ledger(path)  # the chain continues after a further restart, and is no longer "rolled back"
    assert led.last_seq == 6 and not led.rolled_back
    led.close()


# -- ack watermark --------------------------------------------------------------------------------------------
def test_ack_watermark_moves_forward_only(ledger: Ledger) -> None:
    fill(ledger, 10)
    assert ledger.acked_upto == 0 and ledger.unsynced == 10
    assert ledger.set_acked(4) is True
    assert ledger.acked_upto == 4 and ledger.unsynced == 6
    assert ledger.set_acked(2) is False
    assert ledger.set_acked(4) is False
    assert ledger.acked_upto == 4 and ledger.unsynced == 6
    assert ledger.set_acked(10) is True
    assert ledger.acked_upto == 10 and ledger.unsynced == 0
    fill(ledger, 3)
    assert ledger.unsynced == 3


def test_ack_watermark_never_beyond_last_seq(ledger: Ledger) -> None:
    fill(ledger, 5)
    ledger.set_acked(50)
    assert ledger.acked_upto <= 5
    assert ledger.unsynced == 5 - ledger.acked_upto


def test_ack_watermark_survives_reopen(path: Path) -> None:
    led = Ledger(path)
    fill(led, 8)
    led.set_acked(6)
    led.close()
    led = Ledger(path)
    assert led.acked_upto == 6 and led.unsynced == 2
    led.close()


# -- batches ----------------------------------------------------------------------------------------------------
def test_batch_from_consecutive_and_max_records(ledger: Ledger) -> None:
    recs = fill(ledger, 10)
    out, last = ledger.batch_from(3, 4, 10**6)
    assert last == 6
    parsed = [json.loads(t) for t in out]
    assert [p["seq"] for p in parsed] == [3, 4, 5, 6]
    assert parsed == [r.wire() for r in recs[2:6]]


def test_batch_from_at_the_end(ledger: Ledger) -> None:
    fill(ledger, 3)
    out, last = ledger.batch_from(3, 100, 10**6)
    assert [json.loads(t)["seq"] for t in out] == [3] and last == 3
    out, last = ledger.batch_from(4, 100, 10**6)
    assert out == [] and last == 3


def test_batch_from_respects_max_bytes(ledger: Ledger) -> None:
    fill(ledger, 10, {"pad": "x" * 1000})
    one = len(ledger.batch_from(1, 1, 10**6)[0][0].encode())
    out, last = ledger.batch_from(1, 100, 3 * one + 10)
    assert len(out) == 3 and last == 3
    assert sum(len(t.encode()) + 1 for t in out) <= 3 * one + 10
    out, last = ledger.batch_from(1, 100, 3 * one + 2)  # not room for 3 plus separators
    assert len(out) == 2 and last == 2
    assert [json.loads(t)["seq"] for t in out] == [1, 2]


def test_batch_from_counts_utf8_bytes(ledger: Ledger) -> None:
    fill(ledger, 4, {"pad": "香" * 300})  # 900 bytes of UTF-8, 300 characters
    text = ledger.batch_from(1, 1, 10**6)[0][0]
    assert len(text.encode()) > len(text) + 500
    out, _ = ledger.batch_from(1, 100, 2 * len(text.encode()) + 2)
    assert len(out) == 2


def test_batch_from_stops_at_a_hole(ledger: Ledger, path: Path) -> None:
    fill(ledger, 8)
    ledger.execute("DELETE FROM records WHERE seq IN (4, 5)")
    out, last = ledger.batch_from(1, 100, 10**6)
    assert [json.loads(t)["seq"] for t in out] == [1, 2, 3] and last == 3
    out, last = ledger.batch_from(4, 100, 10**6)
    assert [json.loads(t)["seq"] for t in out] == [6, 7, 8] and last == 8


# -- pruning ----------------------------------------------------------------------------------------------------
def test_prune_synced_never_deletes_unsynced(ledger: Ledger, path: Path) -> None:
    fill(ledger, 10)
    ledger.set_acked(6)
    deleted = ledger.prune_synced("2099-01-01T00:00:00.000Z")
    assert deleted == 6
    assert [r[0] for r in raw_rows(path)] == [7, 8, 9, 10]
    assert ledger.verify()[0] is None  # the chain is checked from the first kept record
    rec = ledger.append("event", {"kind": "after"}, AT)
    assert rec.seq == 11


def test_prune_synced_respects_the_cutoff(ledger: Ledger, path: Path) -> None:
    for i in range(6):
        ledger.append("event", {"i": i}, f"2026-0{i + 1}-01T00:00:00.000Z")
    ledger.set_acked(6)
    assert ledger.prune_synced("2026-03-15T00:00:00.000Z") == 3
    assert [r[0] for r in raw_rows(path)] == [4, 5, 6]


def test_prune_with_nothing_acked_deletes_nothing(ledger: Ledger, path: Path) -> None:
    fill(ledger, 5)
    assert ledger.prune_synced("2099-01-01T00:00:00.000Z") == 0
    assert len(raw_rows(path)) == 5


def test_prune_keeps_the_tip_so_numbering_continues(path: Path) -> None:
    led = Ledger(path)
    fill(led, 4)
    led.set_acked(4)
    led.prune_synced("2099-01-01T00:00:00.000Z")
    tip = led.last_hash
    led.close()
    assert [r[0] for r in raw_rows(path)][-1] == 4
    led = Ledger(path)
    assert led.last_seq == 4 and led.last_hash == tip
    assert led.append("event", {}, AT).seq == 5
    led.close()


# -- refusing to open ------------------------------------------------------------------------------------------------
def test_readonly_open_of_missing_file_raises(tmp_path: Path) -> None:
    p = tmp_path / "nope" / "ledger.db"
    with pytest.raises(LedgerError):
        Ledger(p, readonly=True)
    assert not p.exists() and not p.parent.exists()


def test_readonly_open_reads_an_existing_ledger(path: Path) -> None:
    led = Ledger(path)
    recs = fill(led, 3)
    led.close()
    ro = Ledger(path, readonly=True)
    assert ro.last_seq == 3 and ro.last_hash == recs[-1].hash
    assert ro.verify()[0] is None
    ro.close()


@pytest.mark.parametrize("dirname", ["a#b", "a?b"])
def test_readonly_open_with_special_characters_in_path(tmp_path: Path, dirname: str) -> None:
    p = tmp_path / dirname / "ledger.db"
    led = Ledger(p)
    fill(led, 2)
    led.close()
    before = sorted(x.name for x in tmp_path.iterdir())
    try:
        ro = Ledger(p, readonly=True)
        assert ro.last_seq == 2
        ro.close()
    finally:
        assert sorted(x.name for x in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 50, b"hello", b"SQLite format 3\x00" + b"\xff" * 200, b"\x00" * 4096],
    ids=["text", "short", "bad-header", "zeros"],
)
@pytest.mark.parametrize("readonly", [False, True])
def test_non_sqlite_file_raises_and_is_left_unchanged(tmp_path: Path, content: bytes, readonly: bool) -> None:
    p = tmp_path / "ledger.db"
    p.write_bytes(content)
    with pytest.raises(LedgerError):
        Ledger(p, readonly=readonly)
    assert p.read_bytes() == content


# -- session journal --------------------------------------------------------------------------------------------
def test_session_journal_round_trip(path: Path) -> None:
    led = Ledger(path)
    with led.transaction() as tx:
        tx.open_session(session_id="s2", command_id="c2", door=2, shopper="sh-2", auth="qr",
                        baseline={"B1": 800.0}, unlock_at=1_800_000_010.0)
        tx.open_session(session_id="s1", command_id="c1", door=1, shopper="sh-1", auth="face",
                        baseline={"A1": 1500.5, "A2": 250.0}, unlock_at=1_800_000_000.0)
    rows = led.active_sessions()
    assert [r["session_id"] for r in rows] == ["s1", "s2"]  # by unlock time
    s1 = rows[0]
    assert s1["command_id"] == "c1" and s1["door"] == 1 and s1["shopper"] == "sh-1" and s1["auth"] == "face"
    assert s1["baseline"] == {"A1": 1500.5, "A2": 250.0}
    assert s1["unlock_at"] == 1_800_000_000.0
    assert s1["opened_at"] is None and s1["closed_at"] is None and s1["scans"] == []
    assert s1["state"] != "ended"

    with led.transaction() as tx:
        tx.update_session("s1", opened_at=1_800_000_002.5, state="open", scans=["06901234567892"])
    led.close()

    led = Ledger(path)  # the journal survives a restart
    s1 = next(r for r in led.active_sessions() if r["session_id"] == "s1")
    assert s1["opened_at"] == 1_800_000_002.5 and s1["state"] == "open" and s1["scans"] == ["06901234567892"]
    with led.transaction() as tx:
        tx.update_session("s1", closed_at=1_800_000_030.0, state="settling")
    assert next(r for r in led.active_sessions() if r["session_id"] == "s1")["closed_at"] == 1_800_000_030.0
    with led.transaction() as tx:
        tx.append("sale", {"session_id": "s1"}, AT)
        tx.update_session("s1", state="ended", ended_at=1_800_000_040.0)
    assert [r["session_id"] for r in led.active_sessions()] == ["s2"]
    led.close()


def test_duplicate_session_id_is_refused(ledger: Ledger) -> None:
    with ledger.transaction() as tx:
        tx.open_session(session_id="s1", command_id="c1", door=1, shopper="x", auth="qr", baseline={}, unlock_at=1.0)
    with pytest.raises(sqlite3.IntegrityError):
        with ledger.transaction() as tx:
            tx.open_session(session_id="s1", command_id="c9", door=2, shopper="y", auth="qr", baseline={},
                            unlock_at=2.0)
    assert [(r["session_id"], r["door"]) for r in ledger.active_sessions()] == [("s1", 1)]


def test_seen_commands(path: Path) -> None:
    led = Ledger(path)
    assert not led.command_seen("c1")
    with led.transaction() as tx:
        tx.remember_command("c1", 100.0)
        tx.remember_command("c2", 200.0)
        tx.remember_command("c3", 150.0)
    assert led.command_seen("c1") and led.command_seen("c2") and led.command_seen("c3")
    assert not led.command_seen("c4")
    led.close()
    led = Ledger(path)  # remembered across restarts
    assert led.command_seen("c1")
    with led.transaction() as tx:
        tx.forget_commands_before(150.0)
    assert not led.command_seen("c1")
    assert led.command_seen("c3")  # expires exactly at the cutoff: kept
    assert led.command_seen("c2")
    led.close()


def test_idle_reports_are_due_once_per_period_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    led = Ledger(path)
    assert led.idle_report_due("06901234560015", 1000.0, 3600.0) is True
    assert led.idle_report_due("06901234560015", 1000.0 + 3599.0, 3600.0) is False
    assert led.idle_report_due("06971234500014", 1500.0, 3600.0) is True   # another code
    led.close()
    led = Ledger(path)                                                     # a restart keeps them
    assert led.idle_report_due("06901234560015", 2000.0, 3600.0) is False
    assert led.idle_report_due("06901234560015", 1000.0 + 3600.0, 3600.0) is True
    led.close()
