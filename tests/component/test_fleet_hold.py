"""The fleet simulator's hold, which ``scripts/bench_fleet.py`` starts its drain with: held cabinets
connect but publish nothing, their status included, until ``go()``; then each sends its status and
its backlog together, as a cabinet coming online does. A status sent before the go announced
records the workers then waited for in vain, and asked every cabinet to resend."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.platform import fleet, keys
from agent.sim.broker import PrivateBroker
from helpers import subscriber, wait_until

pytestmark = pytest.mark.timeout(60)


class Watcher:
    """Everything published under ``cab/v1/HOLD-*``, in arrival order."""

    def __init__(self, broker: PrivateBroker) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = subscriber(broker.host, broker.port, "hold-watcher", "cab/v1/#", self._on_message)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith("cab/v1/HOLD-"):
            with self._lock:
                self.seen.append((msg.topic, bytes(msg.payload)))

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.seen]

    def statuses(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p in self.seen if t.endswith("/status")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_held_group_sends_nothing_before_the_go(broker: PrivateBroker, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    spec = fleet.FleetSpec(brokers=(broker.url,), cabinet_ids=fleet.cabinet_ids(2, "HOLD"),
                           data_dir=str(tmp_path / "fleet"), public_key=keys.public_key_b64(key),
                           sessions_per_min=0, backlog=3, hold=True)
    watcher = Watcher(broker)
    group = fleet.CabinetGroup(spec)
    try:
        group.prefill()
        group.start()
        wait_until(lambda: group.take_stats().connected == 2, 20, "both cabinets connected")
        # The assertion itself, not a synchronisation: past the links' connect handling and a status
        # sweep (every SWEEP_S), a held cabinet has published nothing.
        threading.Event().wait(fleet.SWEEP_S + 0.5)
        assert watcher.topics() == []
        group.go()
        wait_until(lambda: {t for t in watcher.topics() if t.endswith("/records")}
                   == {"cab/v1/HOLD-0001/records", "cab/v1/HOLD-0002/records"}, 20, "both backlogs sent")
        wait_until(lambda: len(watcher.statuses()) >= 2, 20, "both statuses sent")
        assert {(s["cabinet"], s["online"], s["last_seq"]) for s in watcher.statuses()} \
            == {("HOLD-0001", True, 3), ("HOLD-0002", True, 3)}
        first = {}
        for topic in watcher.topics():
            first.setdefault(topic.split("/")[2], topic)
        assert all(t.endswith("/status") for t in first.values())    # the status first, then the records
    finally:
        group.stop()
        watcher.close()
