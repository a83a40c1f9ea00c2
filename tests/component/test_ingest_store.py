"""The ingest's storage rules (platform.md, Ingest) on both backends, without MQTT: exactly once by
(cabinet, seq), conflicts, broken chains, gaps, late starts, statuses, the report, and two
workers writing the same cabinets at once. Records come from the agent's real ledger."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from agent import protocol
from agent.platform import intake, report
from agent.platform.chain import Batch, BatchError, hash_and_body, parse_batch
from agent.platform.dsn import open_store
from agent.platform.store import StatusUpdate, Store
from agent.store.ledger import Ledger
from platform_helpers import db_dsn, ledger_batch, make_ledger, pg_dsn  # noqa: F401

pytestmark = pytest.mark.timeout(120)

NOW = 1_800_000_000.0


@pytest.fixture
def store(db_dsn: str) -> Any:  # noqa: F811 - the fixture
    s = open_store(db_dsn)
    try:
        yield s
    finally:
        s.close()


def feed(store: Store, *payloads: bytes, now: float = NOW,
         statuses: tuple[StatusUpdate, ...] = ()) -> intake.FlushResult:
    """One flush of records messages, as a worker applies what it received since its last commit."""
    return intake.apply_flush(store, [parse_batch(p) for p in payloads], list(statuses), now)


def state(store: Store, cabinet: str) -> dict[str, Any]:
    return next(c for c in report.build(store)["cabinets"] if c["cabinet"] == cabinet)


def tampered(payload: bytes, index: int, recompute: bool = False, **changes: Any) -> bytes:
    """The batch with record ``index`` changed; with ``recompute`` its hash is made to fit the new content."""
    obj = json.loads(payload)
    rec = obj["records"][index]
    for key, value in changes.items():
        if key in rec:
            rec[key] = value
        else:
            rec["body"][key] = value
    if recompute:
        rec["hash"] = protocol.record_hash_of(rec)
    return json.dumps(obj).encode()


def test_hash_and_body_is_the_contract_hash() -> None:
    body = {"z": [1, {"b": "é中", "a": None}], "a": -1.5, "emoji": "🍄", "nested": {"y": True, "x": "\u2028"}}
    digest, body_json = hash_and_body(7, "event", "2026-11-29T08:15:02.123Z", "ab" * 32, body)
    assert digest == protocol.record_hash(7, "event", "2026-11-29T08:15:02.123Z", "ab" * 32, body)
    assert body_json == protocol.canonical(body).decode()


def test_in_order_batches_are_stored_once_and_acked_to_the_end(store: Store, tmp_path: Path) -> None:
    led = make_ledger(tmp_path, "CAB-A", 250)
    results = [feed(store, ledger_batch(led, lo, lo + 49)) for lo in range(1, 251, 50)]
    assert [r.acks["CAB-A"] for r in results] == [50, 100, 150, 200, 250]
    assert sum(r.stored for r in results) == 250 and not any(r.anomalies for r in results)

    again = feed(store, ledger_batch(led, 1, 100), ledger_batch(led, 51, 150))   # resent after a lost ack
    assert (again.stored, again.duplicates, again.anomalies, again.acks) == (0, 200, [], {"CAB-A": 250})

    cab = state(store, "CAB-A")
    sales = [r for r in led.records(newest_first=False) if r.type == "sale"]
    assert cab == {"cabinet": "CAB-A", "records": 250, "acked_upto": 250, "gaps": [], "chain_ok": True,
                   "online": None, "sales": len(sales), "sales_cents": sum(r.body["total_cents"] for r in sales),
                   "flagged_sales": sum(1 for r in sales if r.body["flags"]),
                   "uncertified_scans": 250 - len(sales)}
    [product] = report.build(store)["products"]
    assert product == {"gtin": "06901234560016", "name": "Dried shiitake 250 g",
                       "units": sum(r.body["items"][0]["qty"] for r in sales),
                       "cents": sum(r.body["total_cents"] for r in sales)}


def test_a_gap_is_never_acked_past_and_is_closed_by_the_missing_records(store: Store, tmp_path: Path) -> None:
    led = make_ledger(tmp_path, "CAB-G", 30)
    assert feed(store, ledger_batch(led, 21, 30)).acks == {"CAB-G": 0}
    assert feed(store, ledger_batch(led, 1, 10)).acks == {"CAB-G": 10}
    assert state(store, "CAB-G")["gaps"] == [[11, 20]]
    [gapped] = store.gapped()
    assert (gapped.cabinet, gapped.acked_upto, gapped.gap_since) == ("CAB-G", 10, NOW)
    assert intake.due_gaps(store, NOW + 1, 30) == []                       # younger than the grace
    assert intake.due_gaps(store, NOW + 5, 30) == [intake.GapAction("CAB-G", "resend", 11)]

    assert feed(store, ledger_batch(led, 11, 20)).acks == {"CAB-G": 30}  # walks over what waited
    assert store.gapped() == [] and state(store, "CAB-G")["chain_ok"] is True


def test_a_conflicting_record_is_an_anomaly_and_the_first_stays(store: Store, tmp_path: Path) -> None:
    led = make_ledger(tmp_path, "CAB-C", 10)
    feed(store, ledger_batch(led, 1, 10))
    other = tampered(ledger_batch(led, 5, 5), 0, recompute=True, total_cents=1)   # a valid record, another content
    result = feed(store, other)
    assert result.stored == 0 and result.acks == {"CAB-C": 10}
    [anomaly] = report.build(store)["anomalies"]
    assert (anomaly["cabinet"], anomaly["seq"], anomaly["kind"]) == ("CAB-C", 5, "conflict")
    assert state(store, "CAB-C")["chain_ok"] is False
    assert state(store, "CAB-C")["sales_cents"] == sum(r.body.get("total_cents", 0) for r in led.records())
    feed(store, other)
    assert len(report.build(store)["anomalies"]) == 1        # the same anomaly is recorded once


def test_a_record_whose_hash_does_not_verify_is_not_stored_nor_acked(store: Store, tmp_path: Path) -> None:
    led = make_ledger(tmp_path, "CAB-F", 10)
    feed(store, ledger_batch(led, 1, 5))
    forged = tampered(ledger_batch(led, 6, 10), 0, total_cents=999_999)          # seq 6 altered, hash kept
    result = feed(store, forged)
    assert result.acks == {"CAB-F": 5} and result.stored == 4                     # 7..10 wait above the hole
    [anomaly] = report.build(store)["anomalies"]
    assert (anomaly["seq"], anomaly["kind"]) == (6, "broken_chain") and "bad_hash" in anomaly["detail"]
    assert feed(store, ledger_batch(led, 6, 6)).acks == {"CAB-F": 10}            # the genuine one closes it


def test_a_record_that_does_not_link_is_broken_chain(store: Store, tmp_path: Path) -> None:
    led = make_ledger(tmp_path, "CAB-L", 10)
    feed(store, ledger_batch(led, 1, 5))
    relinked = tampered(ledger_batch(led, 6, 6), 0, recompute=True, prev="ab" * 32)   # hash fits, prev does not
    assert feed(store, relinked).acks == {"CAB-L": 5}
    first = tampered(ledger_batch(led, 1, 1), 0, recompute=True, prev="cd" * 32)
    feed(store, first.replace(b"CAB-L", b"CAB-M"))                                # seq 1 must point at zeros
    kinds = [(a["cabinet"], a["seq"], a["kind"], a["detail"].split(":")[0]) for a in report.build(store)["anomalies"]]
    assert kinds == [("CAB-L", 6, "broken_chain", "bad_prev"), ("CAB-M", 1, "broken_chain", "bad_prev")]
    assert state(store, "CAB-M")["records"] == 0 and state(store, "CAB-M")["acked_upto"] == 0


def test_a_chain_that_starts_late_is_accepted_after_a_resend(store: Store, tmp_path: Path) -> None:
    led = make_ledger(tmp_path, "CAB-P", 60)          # the cabinet pruned 1..50
    feed(store, ledger_batch(led, 51, 60))
    assert intake.due_gaps(store, NOW + 3, 10, grace_s=2) == [intake.GapAction("CAB-P", "resend", 1)]
    assert store.claim_resend("CAB-P", NOW + 3, 10) is True
    assert store.claim_resend("CAB-P", NOW + 3, 10) is False                  # another worker: not again
    assert intake.due_gaps(store, NOW + 8, 10, grace_s=2) == []               # the resend is given time
    feed(store, ledger_batch(led, 51, 60), now=NOW + 9)                       # it resent what it has
    assert intake.due_gaps(store, NOW + 14, 10, grace_s=2) == [intake.GapAction("CAB-P", "starts_late", 1)]
    assert intake.accept_late_start(store, "CAB-P", NOW + 14) == 60
    assert intake.accept_late_start(store, "CAB-P", NOW + 14) is None         # idempotent
    assert store.gapped() == []
    cab = state(store, "CAB-P")
    assert (cab["acked_upto"], cab["gaps"], cab["chain_ok"]) == (60, [[1, 50]], False)
    [anomaly] = report.build(store)["anomalies"]
    assert (anomaly["seq"], anomaly["kind"]) == (51, "starts_late")
    assert feed(store, ledger_batch(_extend(led, 5), 61, 65)).acks == {"CAB-P": 65}   # and on from there


def _extend(led: Ledger, n: int) -> Ledger:
    with led.transaction() as tx:
        for _ in range(n):
            tx.append("event", {"kind": "door_forced", "door": 1}, "2026-11-29T09:00:00.000Z")
    return led


def test_records_a_status_announced_are_asked_for_when_none_come(store: Store, tmp_path: Path) -> None:
    """The tail of a feed lost (nothing arrives above it to show a hole): the status's last_seq tells."""
    led = make_ledger(tmp_path, "CAB-T", 30)
    status = StatusUpdate("CAB-T", '{"last_seq":30,"online":true}', True, "2026-11-29T08:00:00.000Z", 30)
    assert feed(store, ledger_batch(led, 1, 10), statuses=(status,)).acks == {"CAB-T": 10}
    assert intake.due_gaps(store, NOW + 6, 30) == [intake.GapAction("CAB-T", "resend", 11)]
    assert feed(store, ledger_batch(led, 11, 30), now=NOW + 7).acks == {"CAB-T": 30}
    assert store.gapped() == []
    later = StatusUpdate("CAB-T", '{"last_seq":30,"online":true}', True, "2026-11-29T08:01:00.000Z", 30)
    intake.apply_flush(store, [], [later], NOW + 60)                 # nothing missing: no gap
    assert store.gapped() == []


def test_text_that_needs_escaping_is_stored_exactly(store: Store, tmp_path: Path) -> None:
    led = Ledger(tmp_path / "CAB-E" / "ledger.db")
    body = {"kind": "note", "text": 'a "quote", a back\\slash, a tab\t, a line\nbreak, 中文, \u2028'}
    led.append("event", body, "2026-11-29T08:00:00.000Z")
    led.append("event", {"kind": "x"}, "2026-11-29\t08:00:01")     # an odd ``at`` is still text to keep
    assert feed(store, ledger_batch(led, 1, 2)).acks == {"CAB-E": 2}
    again = feed(store, ledger_batch(led, 1, 2))
    assert again.duplicates == 2 and again.anomalies == []           # what is stored hashes as it arrived


def test_the_latest_received_status_wins(store: Store) -> None:
    def status(online: bool, received: str) -> StatusUpdate:
        text = protocol.canonical({"online": online, "cabinet": "CAB-S"}).decode()
        return StatusUpdate("CAB-S", text, online, received)

    intake.apply_flush(store, [], [status(True, "2026-11-29T08:00:02.000Z")], NOW)
    intake.apply_flush(store, [], [status(False, "2026-11-29T08:00:01.000Z")], NOW)   # older, from another worker
    assert state(store, "CAB-S")["online"] is True
    intake.apply_flush(store, [], [status(False, "2026-11-29T08:00:03.000Z")], NOW)
    assert state(store, "CAB-S")["online"] is False


def test_two_workers_writing_the_same_cabinets_at_once(db_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    """Batches of 20 cabinets dealt alternately to two stores (two connections), as a shared
    subscription deals them: every record once, every cabinet acked to its end, no deadlock."""
    ledgers = [make_ledger(tmp_path, f"CAB-{i:02d}", 100) for i in range(20)]
    batches = [[ledger_batch(led, lo, lo + 9) for lo in range(1, 101, 10)] for led in ledgers]
    deals: list[list[list[bytes]]] = [[], []]
    for k in range(10):                       # round k: batch k of every cabinet, in flushes of 5 messages
        round_msgs = [b[k] for b in batches]
        for j in range(0, 20, 5):
            deals[(k + j // 5) % 2].append(round_msgs[j:j + 5])
    errors: list[BaseException] = []
    acks: dict[str, int] = {}
    lock = threading.Lock()

    def worker(flushes: list[list[bytes]]) -> None:
        try:
            s = open_store(db_dsn)   # beside the other worker, which may be writing already
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
            return
        try:
            for msgs in flushes:
                result = intake.apply_flush(s, [parse_batch(m) for m in msgs], [], NOW)
                with lock:
                    for cab, upto in result.acks.items():
                        acks[cab] = max(acks.get(cab, 0), upto)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(d,)) for d in deals]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    s = open_store(db_dsn)
    try:
        cabs = report.build(s)["cabinets"]
        assert [(c["records"], c["acked_upto"], c["chain_ok"]) for c in cabs] == [(100, 100, True)] * 20
        assert report.build(s)["anomalies"] == []
    finally:
        s.close()
    assert acks == {led.path.parent.name: 100 for led in ledgers}


def test_report_cli_tables_and_json(store: Store, db_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    led = make_ledger(tmp_path, "CAB-R", 12)
    feed(store, ledger_batch(led, 1, 12), tampered(ledger_batch(led, 3, 3), 0, total_cents=1))
    out = subprocess.run([sys.executable, "-m", "agent.cli.platform", "report", "--db", db_dsn, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data == report.build(store)
    assert set(data) == {"cabinets", "products", "anomalies"}
    assert data["cabinets"][0]["records"] == 12 and data["anomalies"][0]["kind"] == "broken_chain"
    tables = subprocess.run([sys.executable, "-m", "agent.cli.platform", "report", "--db", db_dsn],
                            capture_output=True, text=True, timeout=60)
    assert tables.returncode == 0, tables.stderr
    lines = tables.stdout.splitlines()
    assert lines[0] == "cabinets (1)" and lines[1].split()[:3] == ["cabinet", "records", "acked"]
    assert lines[3].split()[:5] == ["CAB-R", "12", "12", "-", "BROKEN"]   # a forged record was seen
    assert "anomalies (1)" in lines and any("broken_chain" in ln for ln in lines)


def test_report_cli_refuses_a_missing_database_and_a_bad_dsn(tmp_path: Path) -> None:
    missing = subprocess.run([sys.executable, "-m", "agent.cli.platform", "report", "--db",
                              f"sqlite:///{tmp_path}/none.db"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no database" in missing.stderr
    bad = subprocess.run([sys.executable, "-m", "agent.cli.platform", "report", "--db", "mysql://x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--db is" in bad.stderr


def test_a_batch_for_another_cabinet_is_refused() -> None:
    from agent.platform.chain import BatchError

    with pytest.raises(BatchError):
        parse_batch(b'{"cabinet":"CAB-X","records":[]}', "CAB-Y")
    with pytest.raises(BatchError):
        parse_batch(b'{"cabinet":"bad id!","records":[]}')
    assert parse_batch(b'{"cabinet":"CAB-X","records":[{"seq":0}]}').rejected[0].seq is None
    assert isinstance(parse_batch(b'{"cabinet":"CAB-X","records":[]}'), Batch)


def test_backslashes_alone_are_escaped_for_copy_and_stored_exactly(store: Store, tmp_path: Path) -> None:
    """The fast COPY path: no tab or newline in any field, only backslashes (JSON's own escapes) to double."""
    led = Ledger(tmp_path / "CAB-B" / "ledger.db")
    led.append("event", {"kind": "note", "text": 'say "hi" \\ back\\slash \\n not a newline, \u00e9'},
               "2026-11-29T08:00:00.000Z")
    led.append("event", {"kind": "note", "text": "plain"}, "2026-11-29T08:00:01.000Z")
    assert feed(store, ledger_batch(led, 1, 2)).acks == {"CAB-B": 2}
    again = feed(store, ledger_batch(led, 1, 2))
    assert again.duplicates == 2 and again.anomalies == []


def _record(seq: int, prev: str, at: str, body: Any) -> dict[str, Any]:
    """A record whose hash fits its content as Python's json reads it (NaN included)."""
    return {"seq": seq, "type": "event", "at": at, "prev": prev, "body": body,
            "hash": protocol.record_hash(seq, "event", at, prev, body)}


@pytest.mark.parametrize("poison", ["nan", "nul"])
def test_a_record_no_database_can_hold_is_refused_alone(store: Store, tmp_path: Path, poison: str) -> None:
    """NaN is not JSON (the json column refuses it) and a NUL is no text: such a record, hash and all,
    is broken_chain, and the records it arrived with in the same transaction are stored and acked."""
    good = make_ledger(tmp_path, "CAB-G", 3)
    first = _record(1, protocol.ZERO_HASH, "2026-11-29T08:00:00.000Z", {"kind": "x"})
    bad = _record(2, first["hash"], "2026-11-29T08:00:01.000Z\x00" if poison == "nul" else "2026-11-29T08:00:01.000Z",
                  {"kind": "x", "v": float("nan") if poison == "nan" else 1})
    payload = json.dumps({"cabinet": "CAB-P", "records": [first, bad]}).encode()
    result = feed(store, ledger_batch(good, 1, 3), payload)
    assert result.acks == {"CAB-G": 3, "CAB-P": 1}
    [anomaly] = report.build(store)["anomalies"]
    assert (anomaly["cabinet"], anomaly["seq"], anomaly["kind"]) == ("CAB-P", 2, "broken_chain"), anomaly
    assert ("NaN is not JSON" if poison == "nan" else "NUL") in anomaly["detail"], anomaly


def test_a_payload_nested_too_deeply_is_malformed_not_a_crash() -> None:
    with pytest.raises(BatchError):
        parse_batch(b'{"cabinet":"CAB-X","records":[' + b"[" * 200_000 + b"]" * 200_000 + b"]}")


def test_bodies_encoded_together_split_exactly_even_around_the_separator(tmp_path: Path) -> None:
    """One encode call per batch, split on a random separator; a body holding the separator itself is
    seen (the split comes out one piece too many) and every body is then encoded alone."""
    from agent.platform import chain

    token = chain._SEPARATOR_TOKEN
    led = Ledger(tmp_path / "CAB-S" / "ledger.db")
    for i, text in enumerate(["a", chain._SEPARATOR, f"x{token}y", "\u2028 \\ \"", "z"]):
        led.append("event", {"kind": "note", "text": text, "n": i, "f": 0.1 * i}, f"2026-11-29T08:00:0{i}.000Z")
    batch = parse_batch(ledger_batch(led, 1, 5))      # strings: their quotes are escaped, no false separator
    assert batch.rejected == [] and [r.seq for r in batch.records] == [1, 2, 3, 4, 5]
    assert chain._bodies_json([json.loads(r.body_json) for r in batch.records]) is not None
    led.append("event", {"kind": "note", "list": [1, token, 2]}, "2026-11-29T08:00:06.000Z")   # a real one
    batch = parse_batch(ledger_batch(led, 1, 6))
    assert chain._bodies_json([json.loads(r.body_json) for r in batch.records]) is None        # seen ...
    assert batch.rejected == [] and [r.seq for r in batch.records] == [1, 2, 3, 4, 5, 6]        # ... and right
    for rec in batch.records:
        body = json.loads(rec.body_json)
        assert (rec.hash, rec.body_json) == hash_and_body(rec.seq, rec.type, rec.at, rec.prev, body)


def test_the_group_busy_mark_keeps_the_latest(store: Store) -> None:
    """Workers of a group say when they last had a backlog; their peers read it before asking for resends."""
    assert store.busy_at("ingest") is None
    store.mark_busy("ingest", NOW)
    store.mark_busy("ingest", NOW - 5)          # a peer with a slower clock or an older note: not moved back
    store.mark_busy("other", NOW - 60)
    assert store.busy_at("ingest") == NOW and store.busy_at("other") == NOW - 60
