"""The catalog over MQTT with bounded memory: link -> catalog worker -> store. A document is
verified before anything is staged, at most one waits per topic (the newest), it is handed over
as a spool file, and it is acknowledged once installed or rejected (mqtt.md v1.1)."""

from __future__ import annotations

import base64
import functools
import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.catalog_worker import CatalogWorker
from agent.events import CatalogOutcome, LinkUp
from agent.mqtt_payload import Document
from agent.protocol import sign
from agent.sim.broker import PrivateBroker
from agent.sim.tcpproxy import TcpProxy
from agent.store import catalog as catalog_module
from agent.store.catalog import CatalogStore
from drivers.gs1 import with_check_digit
from helpers import wait_until
from linkkit import CMD, DELTA, RECORDS, SNAPSHOT, LinkRig, Peer, platform_config

pytestmark = pytest.mark.timeout(60)
ISSUED = "2026-11-29T08:00:00.000Z"


def product(i: int) -> dict[str, Any]:
    return {"gtin": with_check_digit(f"0690{i:09d}"), "name": f"Walnut kernels {i} " + "x" * 120,
            "producer": "Huining Cooperative", "origin": "Huining, Gansu", "cert_id": f"PA-2026-{i:06d}",
            "valid_from": "2026-01-01", "valid_until": "2027-12-31", "unit_weight_g": 250.0,
            "weight_tolerance_g": 6.0}


def catalog(key: Ed25519PrivateKey, version: int, n: int) -> bytes:
    doc = {"version": version, "base_version": None, "issued_at": ISSUED, "products": [product(i) for i in range(n)],
           "revoked": []}
    return json.dumps(sign(doc, key)).encode()


def forged(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["sig"] = base64.b64encode(b"\0" * 64).decode()
    return json.dumps(doc).encode()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> Iterator[CatalogStore]:
    s = CatalogStore(tmp_path / "catalog.db", key.public_key())
    yield s
    s.close()


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows handed to the staging table, counted."""
    rows: list[int] = []
    original = catalog_module._Stager.add

    def add(self: Any, batch: list[Any]) -> None:
        rows.append(len(batch))
        original(self, batch)

    monkeypatch.setattr(catalog_module._Stager, "add", add)
    return rows


class Worker:
    def __init__(self, store: CatalogStore) -> None:
        self.outcomes: queue.Queue[CatalogOutcome] = queue.Queue()
        self.worker = CatalogWorker(store, self.outcomes.put)
        self.worker.start()

    def outcome(self, timeout: float = 30) -> CatalogOutcome:
        try:
            return self.outcomes.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no catalog outcome") from None


def test_a_forged_document_is_rejected_before_a_row_is_staged(store: CatalogStore, key: Ed25519PrivateKey,
                                                              staged: list[int]) -> None:
    good = catalog(key, 1, 3000)
    w = Worker(store)
    try:
        w.worker.submit(Document.from_bytes(SNAPSHOT, forged(good)))
        out = w.outcome()
        assert out.error is not None and out.error.reason == "bad_signature"
        assert staged == [] and store.version is None
        w.worker.submit(Document.from_bytes(SNAPSHOT, good))
        out = w.outcome()
        assert out.result is not None and out.result.products == 3000
        assert sum(staged) == 3000
    finally:
        w.worker.stop()


def test_at_most_one_snapshot_waits_the_newest(store: CatalogStore, key: Ed25519PrivateKey) -> None:
    finished: list[str] = []
    w = Worker(store)
    try:
        with w.worker._lock:  # an install is running: everything submitted now waits
            w.worker.submit(Document.from_bytes(SNAPSHOT, catalog(key, 1, 10), release=lambda: finished.append("v1")))
            wait_until(lambda: w.worker.waiting == 0, 10, "the worker took v1 and waits for the lock")
            w.worker.submit(Document.from_bytes(SNAPSHOT, catalog(key, 2, 10), release=lambda: finished.append("v2")))
            w.worker.submit(Document.from_bytes(SNAPSHOT, catalog(key, 3, 10), release=lambda: finished.append("v3")))
            assert w.worker.waiting == 1
            assert finished == ["v2"]  # superseded: acknowledged at once, never installed
        versions = [w.outcome().result.version, w.outcome().result.version]
        assert versions == [1, 3]
        assert store.version == 3
        wait_until(lambda: len(finished) == 3, 10, "every document acknowledged")  # finished after its outcome
        assert sorted(finished) == ["v1", "v2", "v3"]
    finally:
        w.worker.stop()


def test_deltas_wait_in_order_up_to_a_bound(store: CatalogStore) -> None:
    """A burst of deltas (queued in the session while offline) is not collapsed to the last one."""
    finished: list[int] = []
    w = Worker(store)
    try:
        with w.worker._lock:
            for n in range(6):
                done = functools.partial(finished.append, n)
                w.worker.submit(Document.from_bytes(DELTA, b"not json %d" % n, release=done))
                if n == 0:
                    wait_until(lambda: w.worker.waiting == 0, 10, "the worker took the first and waits for the lock")
            assert w.worker.waiting == 4
            assert finished == [1]  # only the oldest waiting one was superseded
        judged = [w.outcome() for _ in range(5)]
        assert all(o.error is not None and o.error.reason == "invalid" for o in judged)
        wait_until(lambda: len(finished) == 6, 10, "every document acknowledged")
        assert finished == [1, 0, 2, 3, 4, 5]  # installed (here: rejected) in the order they came
    finally:
        w.worker.stop()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_a_snapshot_over_mqtt_is_installed_from_its_spool_and_acknowledged(
        broker: PrivateBroker, store: CatalogStore, key: Ed25519PrivateKey, staged: list[int], tmp_path: Path,
        version: str) -> None:
    data = catalog(key, 1, 12_000)  # ~3.6 MB: streamed to a spool file, never held
    assert len(data) > 3 << 20
    peer = Peer(broker.host, broker.port)
    w = Worker(store)
    handed: list[bool] = []

    def sink(doc: Document) -> None:  # what the daemon wires: the worker's submit
        handed.append(doc.in_memory)
        w.worker.submit(doc)

    with TcpProxy(broker.host, broker.port) as proxy:
        rig = LinkRig(platform_config(proxy.host, proxy.port, mqtt_version=version), sink=sink).start()
        try:
            peer.publish(SNAPSHOT, forged(data))  # not retained: delivered once, rejected, acknowledged
            rejected = w.outcome()
            peer.publish(SNAPSHOT, data, retain=True)
            installed = w.outcome()
            assert rejected.error is not None and rejected.error.reason == "bad_signature"
            assert installed.result is not None and installed.result.products == 12_000
            assert sum(staged) == 12_000  # only the genuine one was staged
            assert handed == [False, False]  # both came as spool files
            wait_until(lambda: rig.link.held == 0, 10, "both acknowledged by the worker")
            peer.subscribe(RECORDS)
            assert rig.link.publish(RECORDS, b"barrier") is not None  # after the two PUBACKs
            peer.message(RECORDS)

            before = proxy.down_bytes
            proxy.cut()
            rig.next(LinkUp)
            peer.publish(CMD, b"barrier")
            assert rig.inbound(CMD).payload == b"barrier"
            assert proxy.down_bytes - before < len(data) // 100  # acknowledged: neither comes back
            assert w.outcomes.empty()
        finally:
            rig.stop()
            w.worker.stop()
            peer.close()
