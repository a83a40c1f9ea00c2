"""The ingest worker on a real broker (platform.md, Ingest): shared subscriptions, acks on the
cabinet's broker only after the commit, signed resends for gaps, garbage ignored, two workers
sharing one group. A plain paho client plays the cabinets, with records from the agent's ledger."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.platform import report
from agent.platform.dsn import open_store
from agent.platform.ingest import BackgroundIngest
from agent.sim.broker import PrivateBroker
from helpers import subscriber
from platform_helpers import ledger_batch, make_ledger

pytestmark = pytest.mark.timeout(60)


class FakeCabinets:
    """Publishes records and statuses like cabinets do, and collects the platform's acks and commands."""

    def __init__(self, broker: PrivateBroker) -> None:
        self._cond = threading.Condition()
        self.acks: dict[str, list[int]] = {}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.client = subscriber(broker.host, broker.port, "fake-cabinets", ["cab/v1/+/records/ack", "cab/v1/+/cmd"],
                                 self._on_message)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        cabinet = msg.topic.split("/")[2]
        with self._cond:
            if msg.topic.endswith("/records/ack"):
                self.acks.setdefault(cabinet, []).append(json.loads(msg.payload)["upto"])
            else:
                self.commands.append((cabinet, json.loads(msg.payload)))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def wait(self, predicate: Any, what: str, timeout: float = 20.0) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}: acks {self.acks}, commands {self.commands}")

    def acked(self, cabinet: str) -> int:
        return max(self.acks.get(cabinet, [0]))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def cabinets(broker: PrivateBroker) -> Iterator[FakeCabinets]:
    fake = FakeCabinets(broker)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def workers(broker: PrivateBroker, tmp_path: Path) -> Iterator[Any]:
    made: list[BackgroundIngest] = []

    def make(**kw: Any) -> BackgroundIngest:
        w = BackgroundIngest([broker.url], f"sqlite:///{tmp_path}/ingest.db", **kw).__enter__()
        made.append(w)
        return w

    try:
        yield make
    finally:
        for w in made:
            w.close()


def test_records_are_acked_after_they_are_stored(workers: Any, cabinets: FakeCabinets, tmp_path: Path) -> None:
    w = workers()
    led = make_ledger(tmp_path / "cab", "CAB-W1", 120)
    for lo in (1, 41, 81):
        cabinets.publish("cab/v1/CAB-W1/records", ledger_batch(led, lo, lo + 39))
    cabinets.wait(lambda: cabinets.acked("CAB-W1") == 120, "ack of 120")
    assert cabinets.acks["CAB-W1"] == sorted(cabinets.acks["CAB-W1"])      # cumulative, never backwards
    cab = report.build(w.store)["cabinets"][0]
    assert (cab["cabinet"], cab["records"], cab["acked_upto"], cab["chain_ok"]) == ("CAB-W1", 120, 120, True)
    assert w.worker.stats.stored == 120


def test_a_gap_is_asked_for_with_a_signed_resend(workers: Any, cabinets: FakeCabinets, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    workers(key=key, resend_after_s=1.0, gap_grace_s=1.0)
    led = make_ledger(tmp_path / "cab", "CAB-W2", 30)
    cabinets.publish("cab/v1/CAB-W2/status", protocol.canonical({"online": True, "cabinet": "CAB-W2"}))
    cabinets.publish("cab/v1/CAB-W2/records", ledger_batch(led, 1, 10))
    cabinets.publish("cab/v1/CAB-W2/records", ledger_batch(led, 21, 30))   # 11..20 lost
    cabinets.wait(lambda: bool(cabinets.commands), "a resend command", timeout=15)
    cabinet, command = cabinets.commands[0]
    protocol.verify_signed(command, key.public_key())                      # raises if not the platform's
    assert (cabinet, command["type"], command["args"]) == ("CAB-W2", "resend", {"from_seq": 11})
    ttl = protocol.epoch_of(command["expires_at"]) - protocol.epoch_of(command["issued_at"])
    assert 0 < ttl <= 300
    assert cabinets.acked("CAB-W2") == 10
    cabinets.publish("cab/v1/CAB-W2/records", ledger_batch(led, 11, 20))
    cabinets.wait(lambda: cabinets.acked("CAB-W2") == 30, "ack of 30 once the gap is filled")


def test_no_resend_while_another_worker_of_the_group_drains_a_backlog(workers: Any, cabinets: FakeCabinets,
                                                                      tmp_path: Path) -> None:
    """A record missing at one worker is most likely queued at a peer that is behind: while the store
    says a worker of the group has a backlog, nobody asks; once the group was quiet for the grace, the
    gap is asked for."""
    key = Ed25519PrivateKey.generate()
    workers(key=key, resend_after_s=1.0, gap_grace_s=1.0)
    peer = open_store(f"sqlite:///{tmp_path}/ingest.db")    # another worker of the group, on the same database
    try:
        led = make_ledger(tmp_path / "cab", "CAB-W6", 30)
        cabinets.publish("cab/v1/CAB-W6/status", protocol.canonical({"online": True, "cabinet": "CAB-W6"}))
        cabinets.publish("cab/v1/CAB-W6/records", ledger_batch(led, 1, 10))
        cabinets.publish("cab/v1/CAB-W6/records", ledger_batch(led, 21, 30))   # 11..20 queued at the peer
        cabinets.wait(lambda: cabinets.acked("CAB-W6") == 10, "ack of 10")
        marked = time.time()
        until = marked + 3.0                # the peer drains for 3 s, saying so as a worker does
        while True:
            peer.mark_busy("ingest", marked)
            if marked >= until:
                break
            threading.Event().wait(0.2)
            marked = time.time()
        cabinets.wait(lambda: bool(cabinets.commands), "a resend once the group is quiet", timeout=15)
        cabinet, command = cabinets.commands[0]
        assert (cabinet, command["type"], command["args"]) == ("CAB-W6", "resend", {"from_seq": 11})
        assert protocol.epoch_of(command["issued_at"]) >= marked + 1.0 - 0.01   # not while the peer was busy
    finally:
        peer.close()


def test_retained_statuses_are_read_after_subscribing(broker: PrivateBroker, workers: Any,
                                                       cabinets: FakeCabinets, tmp_path: Path) -> None:
    """A cabinet that published (its status, retained, and its records) while no worker listened,
    as after a broker restart: the worker learns from the retained status and asks."""
    status = protocol.canonical({"online": True, "cabinet": "CAB-W4", "last_seq": 7})
    cabinets.client.publish("cab/v1/CAB-W4/status", status, qos=1, retain=True).wait_for_publish(10)
    key = Ed25519PrivateKey.generate()
    workers(key=key, resend_after_s=1.0, gap_grace_s=0.5)
    cabinets.wait(lambda: any(c == "CAB-W4" for c, _ in cabinets.commands), "a resend from the retained status")
    command = next(cmd for c, cmd in cabinets.commands if c == "CAB-W4")
    assert (command["type"], command["args"]) == ("resend", {"from_seq": 1})
    led = make_ledger(tmp_path / "cab", "CAB-W4", 7)
    cabinets.publish("cab/v1/CAB-W4/records", ledger_batch(led, 1, 7))
    cabinets.wait(lambda: cabinets.acked("CAB-W4") == 7, "ack of 7")


def test_garbage_is_ignored_and_the_worker_goes_on(workers: Any, cabinets: FakeCabinets, tmp_path: Path) -> None:
    w = workers()
    led = make_ledger(tmp_path / "cab", "CAB-W3", 5)
    for payload in (b"", b"not json", b"[1,2]", b'{"cabinet":"CAB-OTHER","records":[]}', b"\xff\xfe",
                    b'{"cabinet":"CAB-W3","records":[{"seq":"1"}]}'):
        cabinets.publish("cab/v1/CAB-W3/records", payload)
        cabinets.publish("cab/v1/CAB-W3/status", payload)
    cabinets.publish("cab/v1/CAB-W3/records", ledger_batch(led, 1, 5))
    cabinets.wait(lambda: cabinets.acked("CAB-W3") == 5, "ack after the garbage")
    assert w.worker.stats.malformed >= 4
    anomalies = report.build(w.store)["anomalies"]
    assert [(a["cabinet"], a["seq"], a["kind"]) for a in anomalies] == [("CAB-W3", None, "broken_chain")]


def test_two_workers_in_one_group_share_the_feeds(workers: Any, cabinets: FakeCabinets, tmp_path: Path) -> None:
    a, b = workers(client_id="w-a"), workers(client_id="w-b")
    ledgers = [make_ledger(tmp_path / "cab", f"CAB-S{i}", 100) for i in range(8)]
    for lo in range(1, 101, 10):
        for led in ledgers:
            cabinets.publish(f"cab/v1/{led.path.parent.name}/records", ledger_batch(led, lo, lo + 9))
    cabinets.wait(lambda: all(cabinets.acked(led.path.parent.name) == 100 for led in ledgers), "every cabinet acked")
    assert a.worker.stats.messages > 0 and b.worker.stats.messages > 0        # the broker dealt to both
    assert a.worker.stats.stored + b.worker.stats.stored == 800               # each record stored once
    assert report.build(a.store)["anomalies"] == []
