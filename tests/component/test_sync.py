"""Record delivery (agent.sync.Syncer) with a real ledger and a fake publish function (mqtt.md, Records)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from agent.store.ledger import Ledger
from agent.sync import MAX_BATCH_BYTES, Syncer

CAB = "CAB-0001"
AT = "2026-11-29T08:15:02.123Z"


class Link:
    """A fake MQTT publish: collects payloads, returns a message id, or None while offline."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.online = True
        self.fail_after: int | None = None  # accept this many more publishes, then go offline

    def __call__(self, payload: bytes) -> int | None:
        if self.fail_after is not None:
            if self.fail_after <= 0:
                self.online = False
            self.fail_after -= 1
        if not self.online:
            return None
        self.payloads.append(payload)
        return len(self.payloads)

    def batches(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.payloads]

    def seqs(self) -> list[list[int]]:
        return [[r["seq"] for r in b["records"]] for b in self.batches()]

    def take(self) -> list[list[int]]:
        out = self.seqs()
        self.payloads.clear()
        return out


@pytest.fixture
def ledger(tmp_path: Path):
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


@pytest.fixture
def link() -> Link:
    return Link()


def fill(led: Ledger, n: int, pad: str = "") -> None:
    with led.transaction() as tx:
        for _ in range(n):
            tx.append("event", {"kind": "test", "i": led.last_seq + 1, "pad": pad}, AT)


def flat(seqs: list[list[int]]) -> list[int]:
    return [s for batch in seqs for s in batch]


def expected_hash(rec: dict[str, Any]) -> str:
    doc = {k: rec[k] for k in ("seq", "type", "at", "prev", "body")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


# -- batches -------------------------------------------------------------------------------------------
def test_batches_are_valid_and_consecutive(ledger: Ledger, link: Link) -> None:
    fill(ledger, 25)
    s = Syncer(ledger, CAB, link, max_batch=10)
    assert s.pump(0.0, True) == 25
    batches = link.batches()
    assert [set(b) for b in batches] == [{"cabinet", "records"}] * 3
    assert all(b["cabinet"] == CAB for b in batches)
    assert link.seqs() == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    prev = "0" * 64
    for rec in (r for b in batches for r in b["records"]):
        assert set(rec) == {"seq", "type", "at", "prev", "hash", "body"}
        assert rec["prev"] == prev and rec["hash"] == expected_hash(rec)
        assert rec["body"] == {"kind": "test", "i": rec["seq"], "pad": ""}
        prev = rec["hash"]
    assert s.sent_upto == 25 and s.batches_sent == 3


def test_nothing_to_send(ledger: Ledger, link: Link) -> None:
    s = Syncer(ledger, CAB, link)
    assert s.pump(0.0, True) == 0
    assert link.payloads == []


def test_new_records_are_sent_on_the_next_pump(ledger: Ledger, link: Link) -> None:
    fill(ledger, 3)
    s = Syncer(ledger, CAB, link, max_batch=10)
    s.pump(0.0, True)
    fill(ledger, 2)
    assert s.pump(1.0, True) == 2
    assert link.seqs() == [[1, 2, 3], [4, 5]]


def test_cabinet_id_is_json_escaped(ledger: Ledger, link: Link) -> None:
    fill(ledger, 1)
    Syncer(ledger, 'we"ird\\id', link).pump(0.0, True)
    assert link.batches()[0]["cabinet"] == 'we"ird\\id'


def test_byte_cap_256_kib(ledger: Ledger, link: Link) -> None:
    fill(ledger, 30, pad="x" * 40_000)
    s = Syncer(ledger, CAB, link, max_batch=100)
    assert s.pump(0.0, True) == 30
    sizes = [len(p) for p in link.payloads]
    assert len(sizes) > 1
    assert all(size <= MAX_BATCH_BYTES == 256 * 1024 for size in sizes)
    seqs = link.seqs()
    assert flat(seqs) == list(range(1, 31))
    assert all(len(b) < 100 for b in seqs)
    # each batch is as full as the cap allows: one more record would not have fit
    one = len(link.payloads[0]) // len(seqs[0])
    assert all(size + one > MAX_BATCH_BYTES for size in sizes[:-1])


def test_byte_cap_with_multibyte_text(ledger: Ledger, link: Link) -> None:
    fill(ledger, 12, pad="香" * 15_000)  # 45,000 UTF-8 bytes each
    Syncer(ledger, CAB, link, max_batch=100).pump(0.0, True)
    assert all(len(p) <= MAX_BATCH_BYTES for p in link.payloads)
    assert flat(link.seqs()) == list(range(1, 13))
    assert len(link.payloads) >= 3


# -- window ----------------------------------------------------------------------------------------------
def test_window_caps_outstanding_records(ledger: Ledger, link: Link) -> None:
    fill(ledger, 300)
    s = Syncer(ledger, CAB, link, max_batch=10, window=50)
    assert s.pump(0.0, True) == 50
    assert flat(link.take()) == list(range(1, 51))
    assert s.pump(1.0, True) == 0  # still nothing acked
    assert link.payloads == []
    assert s.on_ack(20, 2.0)
    assert s.pump(2.0, True) == 20
    assert flat(link.take()) == list(range(51, 71))
    assert s.sent_upto - ledger.acked_upto == 50


def test_window_not_a_multiple_of_max_batch(ledger: Ledger, link: Link) -> None:
    fill(ledger, 400)
    s = Syncer(ledger, CAB, link, max_batch=100, window=150)
    s.pump(0.0, True)
    assert s.sent_upto - ledger.acked_upto <= 150
    assert len(flat(link.seqs())) <= 150


# -- acks --------------------------------------------------------------------------------------------------
def test_on_ack_moves_watermark(ledger: Ledger, link: Link) -> None:
    fill(ledger, 10)
    s = Syncer(ledger, CAB, link, max_batch=100)
    s.pump(0.0, True)
    assert s.on_ack(4, 1.0) is True
    assert ledger.acked_upto == 4 and ledger.unsynced == 6
    assert s.on_ack(3, 2.0) is False
    assert s.on_ack(4, 2.0) is False
    assert ledger.acked_upto == 4
    assert s.on_ack(10, 3.0) is True
    assert ledger.acked_upto == 10 and ledger.unsynced == 0


def test_ack_above_last_seq_is_ignored(ledger: Ledger, link: Link) -> None:
    fill(ledger, 10)
    s = Syncer(ledger, CAB, link, max_batch=100)
    s.pump(0.0, True)
    s.on_ack(3, 1.0)
    assert s.on_ack(11, 2.0) is False
    assert ledger.acked_upto == 3
    assert s.on_ack(10_000, 2.0) is False
    assert ledger.acked_upto == 3


def test_ack_above_last_seq_does_not_reset_the_ack_clock(ledger: Ledger, link: Link) -> None:
    fill(ledger, 5)
    s = Syncer(ledger, CAB, link, max_batch=100, ack_timeout_s=30.0)
    s.pump(0.0, True)
    s.on_ack(99, 29.0)
    link.take()
    assert s.pump(30.5, True) == 5  # the bogus ack was no progress: resend after the timeout
    assert link.take() == [[1, 2, 3, 4, 5]]


def test_syncer_starts_after_the_stored_watermark(tmp_path: Path, link: Link) -> None:
    led = Ledger(tmp_path / "ledger.db")
    fill(led, 10)
    led.set_acked(7)
    led.close()
    led = Ledger(tmp_path / "ledger.db")
    try:
        Syncer(led, CAB, link).pump(0.0, True)
        assert link.seqs() == [[8, 9, 10]]
    finally:
        led.close()


# -- ack timeout and reconnect -------------------------------------------------------------------------------------
def test_ack_timeout_rewinds_to_first_unacked(ledger: Ledger, link: Link) -> None:
    fill(ledger, 10)
    s = Syncer(ledger, CAB, link, max_batch=100, ack_timeout_s=30.0)
    s.pump(0.0, True)
    assert s.on_ack(4, 10.0)
    link.take()
    assert s.pump(25.0, True) == 0
    assert s.pump(40.0, True) == 0  # exactly ack_timeout_s after the last progress: not yet
    assert link.payloads == []
    assert s.pump(40.25, True) == 6
    assert link.take() == [[5, 6, 7, 8, 9, 10]]
    # the ack clock restarted with the resend
    assert s.pump(70.0, True) == 0
    assert s.pump(70.5, True) == 6
    assert link.take() == [[5, 6, 7, 8, 9, 10]]


def test_no_timeout_when_everything_is_acked(ledger: Ledger, link: Link) -> None:
    fill(ledger, 3)
    s = Syncer(ledger, CAB, link)
    s.pump(0.0, True)
    s.on_ack(3, 1.0)
    link.take()
    assert s.pump(1000.0, True) == 0
    assert link.payloads == []


def test_ack_clock_starts_when_something_becomes_outstanding(ledger: Ledger, link: Link) -> None:
    s = Syncer(ledger, CAB, link, ack_timeout_s=30.0)
    s.pump(0.0, True)
    fill(ledger, 2)
    s.pump(500.0, True)  # sent at 500: not "overdue" because nothing was outstanding before
    link.take()
    assert s.pump(520.0, True) == 0
    assert s.pump(530.5, True) == 2


def test_rewind_after_reconnect_resends_from_acked_plus_one(ledger: Ledger, link: Link) -> None:
    fill(ledger, 10)
    s = Syncer(ledger, CAB, link, max_batch=4)
    s.pump(0.0, True)
    s.on_ack(3, 1.0)
    link.take()
    s.rewind(2.0)  # reconnected
    assert s.pump(2.0, True) == 7
    assert link.take() == [[4, 5, 6, 7], [8, 9, 10]]


def test_rewind_to_a_seq_resends_from_there(ledger: Ledger, link: Link) -> None:
    fill(ledger, 10)
    s = Syncer(ledger, CAB, link, max_batch=100)
    s.pump(0.0, True)
    s.on_ack(10, 1.0)
    link.take()
    s.rewind(2.0, to_seq=5)  # resend {"from_seq": 6}
    assert s.pump(2.0, True) == 5
    assert link.take() == [[6, 7, 8, 9, 10]]
    assert ledger.acked_upto == 10


# -- offline -----------------------------------------------------------------------------------------------------------
def test_not_connected_sends_nothing(ledger: Ledger, link: Link) -> None:
    fill(ledger, 5)
    s = Syncer(ledger, CAB, link)
    assert s.pump(0.0, False) == 0
    assert link.payloads == [] and s.sent_upto == 0


def test_publish_returning_none_stops_without_advancing(ledger: Ledger, link: Link) -> None:
    fill(ledger, 10)
    s = Syncer(ledger, CAB, link, max_batch=4)
    link.online = False
    assert s.pump(0.0, True) == 0
    assert s.sent_upto == 0 and s.batches_sent == 0
    link.online = True
    assert s.pump(1.0, True) == 10
    assert link.take() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_publish_failing_midway_resumes_at_the_failed_batch(ledger: Ledger, link: Link) -> None:
    fill(ledger, 10)
    s = Syncer(ledger, CAB, link, max_batch=4)
    link.fail_after = 1
    assert s.pump(0.0, True) == 4
    assert s.sent_upto == 4
    assert link.take() == [[1, 2, 3, 4]]
    link.fail_after, link.online = None, True
    assert s.pump(1.0, True) == 6
    assert link.take() == [[5, 6, 7, 8], [9, 10]]


# -- holes ---------------------------------------------------------------------------------------------------
def test_pruned_records_are_skipped(ledger: Ledger, link: Link) -> None:
    fill(ledger, 20)
    s = Syncer(ledger, CAB, link, max_batch=100)
    s.pump(0.0, True)
    s.on_ack(10, 1.0)
    assert ledger.prune_synced("2099-01-01T00:00:00.000Z") == 10
    link.take()
    s.rewind(2.0, to_seq=0)  # resend from seq 1: 1..10 are gone
    assert s.pump(2.0, True) == 10
    assert link.take() == [list(range(11, 21))]


def test_holes_in_the_middle_split_batches(ledger: Ledger, link: Link) -> None:
    fill(ledger, 12)
    ledger.execute("DELETE FROM records WHERE seq IN (5, 6, 9)")
    s = Syncer(ledger, CAB, link, max_batch=100)
    assert s.pump(0.0, True) == 9
    assert link.take() == [[1, 2, 3, 4], [7, 8], [10, 11, 12]]
    assert s.sent_upto == 12


def test_resend_from_seq_1_of_an_acked_ledger_keeps_to_the_window(tmp_path: Path) -> None:
    """issue 8: a resend below the ack watermark pushed the whole ledger into paho's queue."""
    ledger = Ledger(tmp_path / "ledger.db")
    with ledger.transaction() as tx:
        for i in range(12_000):
            tx.append("event", {"kind": "restock", "i": i}, "2026-11-29T08:15:02.123Z")
    ledger.set_acked(12_000)
    sent: list[bytes] = []
    syncer = Syncer(ledger, "CAB-0001", lambda p: sent.append(p) or len(sent), max_batch=100, window=5000)
    syncer.rewind(0.0, 0)
    assert syncer.pump(1.0, True) == 5000            # one window, not 12,000 records
    assert syncer.pump(2.0, True) == 0
    syncer.on_ack(12_000, 3.0)                        # the platform has it all again: nothing more to resend
    assert syncer.pump(4.0, True) == 0 and syncer.sent_upto == 12_000
