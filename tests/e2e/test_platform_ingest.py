"""Acceptance 1 of issue 11: two ingest workers (one group) on two Mosquitto shards, 20 simulated
cabinets running the agent's ledger, sync and link code, one worker SIGKILLed mid-stream and
restarted -- into PostgreSQL, and the same into SQLite.

Afterwards every record of every cabinet's ledger is stored exactly once and identical, every
stored chain verifies from seq 1, every cabinet is acked to its last seq (on both sides), and
the only anomalies are the two forgeries the test published: a record whose content was
altered (its hash no longer fits) and a record that does not link to its predecessor. Neither
is ever acked.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent import protocol
from agent.platform import fleet, keys, report
from agent.platform.dsn import open_store
from agent.sim.broker import PrivateBroker
from helpers import subscriber, wait_until
from platform_helpers import db_dsn, ledger_batch, make_ledger, pg_dsn  # noqa: F401

pytestmark = pytest.mark.timeout(120)

CABINETS = 20


class Worker:
    """``cabinet-platform ingest`` as a process of its own (so that SIGKILL is real)."""

    def __init__(self, name: str, brokers: list[PrivateBroker], dsn: str, key: Path, log_dir: Path) -> None:
        self.log = log_dir / f"{name}.log"
        argv = [sys.executable, "-m", "agent.cli.platform", "ingest", "--db", dsn, "--group", "ingest",
                "--key", str(key), "--resend-after", "1", "--gap-grace", "1", "--log-level", "info"]
        for b in brokers:
            argv += ["--broker", b.url]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.brokers = len(brokers)

    def subscriptions(self) -> int:
        return self.log.read_text(errors="replace").count("subscribed to ")

    def wait_subscribed(self, before: int = 0) -> None:
        wait_until(lambda: self.subscriptions() >= before + self.brokers or self.proc.poll() is not None,
                   20, f"worker subscribed on {self.brokers} brokers ({self.log})")
        assert self.proc.poll() is None, self.log.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


class Observer:
    """Watches the acks of the forged cabinet and publishes the forgeries, on shard A."""

    def __init__(self, broker: PrivateBroker) -> None:
        self.acks: list[int] = []
        self._lock = threading.Lock()
        self.client = subscriber(broker.host, broker.port, "observer", "cab/v1/CAB-FORGED/records/ack",
                                 self._on_message)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.acks.append(json.loads(msg.payload)["upto"])

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stored_records(dsn: str) -> dict[str, dict[int, tuple[str, str, str, str, Any]]]:
    """Every stored record: cabinet -> seq -> (type, at, prev, hash, body)."""
    sql = "SELECT cabinet, seq, type, at, prev, hash, body FROM records"
    if dsn.startswith("sqlite:"):
        conn = sqlite3.connect(dsn[len("sqlite:///"):])
        rows = [(*r[:6], json.loads(r[6])) for r in conn.execute(sql)]
        conn.close()
    else:
        import psycopg

        with psycopg.connect(dsn) as pg:
            rows = [tuple(r) for r in pg.execute(sql)]
    out: dict[str, dict[int, tuple[str, str, str, str, Any]]] = {}
    for cabinet, seq, type_, at, prev, hash_, body in rows:
        out.setdefault(cabinet, {})[seq] = (type_, at, prev, hash_, body)
    return out


def verify_chain(records: dict[int, tuple[str, str, str, str, Any]]) -> None:
    """The stored chain from seq 1: each hash fits its content and each prev the record before."""
    tip = protocol.ZERO_HASH
    assert sorted(records) == list(range(1, len(records) + 1))
    for seq in range(1, len(records) + 1):
        type_, at, prev, hash_, body = records[seq]
        assert prev == tip, f"seq {seq} does not link"
        assert protocol.record_hash(seq, type_, at, prev, body) == hash_, f"seq {seq} does not hash"
        tip = hash_


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[list[PrivateBroker]]:
    made: list[PrivateBroker] = []
    try:
        for name in ("a", "b"):
            made.append(PrivateBroker(log_dir=tmp_path / f"broker-{name}"))
        yield made
    finally:
        for b in made:
            b.close()


def test_two_workers_two_shards_one_killed(db_dsn: str, shards: list[PrivateBroker], tmp_path: Path) -> None:  # noqa: F811
    key_path = tmp_path / "platform.pem"
    key = keys.write_new_key(key_path)
    workers = [Worker(f"worker-{i}", shards, db_dsn, key_path, tmp_path) for i in range(2)]
    observer: Observer | None = None
    group: fleet.CabinetGroup | None = None
    try:
        for w in workers:
            w.wait_subscribed()
        spec = fleet.FleetSpec(
            brokers=tuple(b.url for b in shards), cabinet_ids=fleet.cabinet_ids(CABINETS, "CAB"),
            data_dir=str(tmp_path / "fleet"), public_key=keys.public_key_b64(key), sessions_per_min=240,
            backlog=30, ack_timeout_s=2.0, status_interval_s=5.0)
        group = fleet.CabinetGroup(spec)
        group.prefill()
        group.start()

        def stats() -> fleet.GroupStats:
            assert group is not None
            return group.take_stats()

        wait_until(lambda: stats().acked >= CABINETS * 30, 20, "the backlogs acked")
        appended = stats().appended
        wait_until(lambda: stats().appended >= appended + 100, 10, "sessions streaming")
        # Frozen first, so that the broker deals it batches it never stores; then killed: they are lost.
        workers[0].proc.send_signal(signal.SIGSTOP)
        appended = stats().appended
        wait_until(lambda: stats().appended >= appended + 100, 10, "batches dealt to the frozen worker")
        workers[0].kill()
        killed_at_stored = sum(len(v) for v in stored_records(db_dsn).values())
        appended = stats().appended
        wait_until(lambda: stats().appended >= appended + 150, 10, "sessions streaming on one worker")
        restarted = Worker("worker-0", shards, db_dsn, key_path, tmp_path)
        restarted.wait_subscribed(before=workers[0].subscriptions())
        workers[0] = restarted

        # The forgeries, on shard A: an altered record of a real cabinet, and a chain that breaks.
        observer = Observer(shards[0])
        real = group.cabinets[0]
        altered = json.loads(ledger_batch(real.ledger, 5, 5))
        altered["records"][0]["body"]["total_cents"] = 1
        observer.publish(f"cab/v1/{real.id}/records", json.dumps(altered).encode())
        forged = make_ledger(tmp_path / "forger", "CAB-FORGED", 2)
        broken = json.loads(ledger_batch(forged, 1, 2))
        broken["records"][1]["prev"] = "ab" * 32
        broken["records"][1]["hash"] = protocol.record_hash_of(broken["records"][1])
        observer.publish("cab/v1/CAB-FORGED/records", json.dumps(broken).encode())

        appended = stats().appended
        wait_until(lambda: stats().appended >= appended + 150, 10, "sessions streaming on two workers again")
        group.set_rate(0)
        wait_until(lambda: stats().undrained == 0, 40, "every cabinet acked to its last seq")
        ledgers = {c.id: {r.seq: r for r in c.ledger.records(newest_first=False)} for c in group.cabinets}
        last_seqs = {c.id: c.ledger.last_seq for c in group.cabinets}
        acked = {c.id: c.ledger.acked_upto for c in group.cabinets}
    finally:
        if group is not None:
            group.stop()
        if observer is not None:
            observer.close()
        rcs = [w.stop() for w in workers]
    assert rcs == [0, 0]
    assert acked == last_seqs
    # what the killed worker held came back: resent by the cabinets (duplicates) or asked for (resends)
    recovered = sum(int(m.group(1)) + int(m.group(2)) for w in workers for m in re.finditer(
        r"(\d+) duplicates, .* (\d+) resends asked", w.log.read_text()))
    assert recovered > 0

    stored = stored_records(db_dsn)
    assert killed_at_stored > 0 and sum(last_seqs.values()) > killed_at_stored
    for cabinet, records in ledgers.items():
        assert {s: r[3] for s, r in stored[cabinet].items()} == {s: r.hash for s, r in records.items()}, cabinet
        verify_chain(stored[cabinet])
    assert sorted(stored["CAB-FORGED"]) == [1]

    store = open_store(db_dsn, create=False)
    try:
        data = report.build(store)
    finally:
        store.close()
    by_cab = {c["cabinet"]: c for c in data["cabinets"]}
    for cabinet, last in last_seqs.items():
        c = by_cab[cabinet]
        assert (c["records"], c["acked_upto"], c["gaps"]) == (last, last, []), c
        assert c["chain_ok"] is (cabinet != real.id)        # the altered copy was seen: flagged, not stored
        assert c["online"] is False                          # the fleet stopped cleanly
    assert by_cab["CAB-FORGED"]["acked_upto"] == 1
    assert sorted((a["cabinet"], a["seq"], a["kind"], a["detail"].split(":")[0]) for a in data["anomalies"]) == \
        sorted([(real.id, 5, "broken_chain", "bad_hash"), ("CAB-FORGED", 2, "broken_chain", "bad_prev")])
    assert observer is not None and max(observer.acks, default=0) <= 1     # the forged record was never acked
