"""Four fault behaviours of issue 8 ("nothing lost, nothing forged, under every fault") through
real processes: the daemon as a subprocess, a private Mosquitto, the simulators on ptys, the
reference platform and ``cabinetctl``.

- a ``resend`` from seq 1 keeps to the 5,000-record window (README, Platform link; mqtt.md);
- a daemon whose core thread died exits 1 and loses nothing (operations.md, Lifecycle);
- the link restarts its network loop when it died, and loses nothing (issue 8, Broker and network);
- a signed catalog whose ``unit_weight_g`` is ``1e400`` is a ``catalog_rejected``, the old catalog
  stays (issue 8, Smaller).

A fault inside the daemon is induced without a hook in the product: a ``sitecustomize.py`` on
the subprocess's ``PYTHONPATH`` wraps one method so that it raises once a trigger file exists
(it removes the file when it fires, which tells the test that it did).

Every wait is on a condition with a deadline (``ReferencePlatform.wait_for``,
``helpers.wait_until``); a command sent after another one is a barrier, because the core handles
its inbox in order and its replies leave on the link in that order.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.control import request
from agent.sim.cabinet import DEMO_PRODUCTS, SimulatedCabinet, Timings
from agent.store.ledger import Ledger
from cabinet_helpers import CabinetFactory, cabinetctl_status, ctl_json, wait_event
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)

WINDOW = 5000
"""Records outstanding at most, counted from the last one known to be with the platform."""


@pytest.fixture
def cabinet_id() -> str:
    return "CAB-GAPS"


# -- helpers -------------------------------------------------------------------------------------------


def control_status(cab: SimulatedCabinet) -> dict[str, Any]:
    """The daemon's status over its control socket, in-process (cheap enough to poll)."""
    answer = request(str(cab.workdir / "control.sock"), "status", timeout_s=10)
    assert answer.get("ok"), answer
    result: dict[str, Any] = answer["result"]
    return result


def barrier(cab: SimulatedCabinet, tap: RecordsTap | None = None) -> None:
    """Everything the core did for what was published to it before has left on the link; with
    ``tap``, it has also reached the tap (the broker delivers to each subscriber on its own: the
    platform holding the reply says nothing about how far another subscriber's queue is)."""
    assert cab.platform
    cid = cab.platform.send_command("status", {})
    reply = cab.platform.wait_reply(cid, 15)
    assert reply["ok"] is True, reply
    if tap is not None:
        tap.wait_for(lambda: cid in tap.replies, 15, f"the reply to {cid}")


def ledger_hashes(cab: SimulatedCabinet) -> dict[int, str]:
    """seq -> hash of every record in the cabinet's ledger (read-only, as cabinetctl reads it)."""
    led = Ledger(cab.workdir / "data" / "ledger.db", readonly=True)
    try:
        return {r.seq: r.hash for r in led.records(newest_first=False)}
    finally:
        led.close()


def assert_nothing_lost(cab: SimulatedCabinet) -> None:
    """The ledger verifies (cabinetctl verify) and the platform verified and holds exactly it."""
    p = cab.platform
    assert p is not None
    assert p.chain_errors == [] and p.errors == 0, (p.chain_errors[:3], p.error_messages[:3])
    ledger = ledger_hashes(cab)
    held = {r["seq"]: r["hash"] for r in p.records_in_order()}
    assert held == ledger
    assert sorted(held) == list(range(1, len(held) + 1))
    verify = cab.ctl("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def wait_all_acked(cab: SimulatedCabinet, timeout: float = 20.0) -> int:
    """Until the platform holds 1..last_seq and the agent counts nothing unsynced; returns last_seq."""
    assert cab.platform
    last = int(control_status(cab)["last_seq"])
    cab.platform.wait_contiguous(last, timeout)
    wait_until(lambda: control_status(cab)["unsynced"] == 0, timeout, "the agent reports 0 unsynced")
    return last


def agent_log(cab: SimulatedCabinet) -> str:
    return cab.agent_log.read_text(errors="replace")


_HOOK = '''\
"""Written by tests/e2e/test_e2e_fault_gaps.py: wraps {module}.{cls}.{method} so that it raises
once after the file named by CABINET_TEST_FAULT_TRIGGER appears (the file is removed as it fires)."""
import os

_trigger = os.environ.get("CABINET_TEST_FAULT_TRIGGER")
if _trigger:
    import {module} as _mod

    _cls = _mod.{cls}
    _orig = _cls.{method}

    def _faulty(self, *args, **kwargs):
        try:
            os.unlink(_trigger)
        except FileNotFoundError:
            return _orig(self, *args, **kwargs)
        raise RuntimeError("fault induced by the test in {cls}.{method}")

    _cls.{method} = _faulty
'''


def induce_fault(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, target: str) -> Path:
    """Make every Python process started from here on (the daemon) raise once in ``target``
    (``module:Class.method``) after the returned trigger file is created."""
    module, _, qual = target.partition(":")
    cls, _, method = qual.partition(".")
    shim = tmp_path / "fault-hook"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_HOOK.format(module=module, cls=cls, method=method))
    trigger = tmp_path / "fault-trigger"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("CABINET_TEST_FAULT_TRIGGER", str(trigger))
    return trigger


class RecordsTap:
    """A bystander subscriber to the cabinet's records topic: the seqs of every batch, in order."""

    def __init__(self, cab: SimulatedCabinet) -> None:
        assert cab.broker
        self.topic = f"cab/v1/{cab.cabinet_id}/records"
        reply_topic = protocol.Topics(cab.cabinet_id).reply
        self._cond = threading.Condition()
        self.batches: list[list[int]] = []
        self.replies: set[str] = set()      # ids of the replies seen: barrier(cab, tap) waits for one
        self._ready = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tap-{uuid.uuid4().hex[:10]}",
                             clean_session=True, protocol=mqtt.MQTTv311)
        client.on_connect = lambda c, *_: c.subscribe([(self.topic, 1), (reply_topic, 1)])
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.connect(cab.broker.host, cab.broker.port, keepalive=30)
        client.loop_start()
        self._client = client
        self.wait_for(lambda: self._ready, 10, "tap subscribed")

    def _on_subscribe(self, *_: Any) -> None:
        with self._cond:
            self._ready = True
            self._cond.notify_all()

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        obj = json.loads(msg.payload)
        with self._cond:
            if msg.topic == self.topic:
                self.batches.append([rec["seq"] for rec in obj["records"]])
            else:
                self.replies.add(obj["id"])
            self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"tap: {what} not reached within {timeout:g} s")

    def mark(self) -> int:
        with self._cond:
            return len(self.batches)

    def seqs(self, since: int = 0) -> list[int]:
        with self._cond:
            return [s for batch in self.batches[since:] for s in batch]

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def prefill_ledger(workdir: Path, count: int) -> None:
    """``count`` records committed into the daemon's ledger before it first starts (the ledger
    API, one transaction): a cabinet that was offline for a long time."""
    led = Ledger(workdir / "data" / "ledger.db")
    try:
        at = protocol.format_ts(dt.datetime.now(dt.timezone.utc))
        with led.transaction() as tx:
            for i in range(count):
                tx.append("event", {"kind": "service_mode", "on": i % 2 == 0, "operator": "backlog"}, at)
    finally:
        led.close()


# -- 1. resend from seq 1 keeps to the window ------------------------------------------------------------


def test_resend_from_seq_1_keeps_to_the_window_and_loses_nothing(tmp_path: Path,
                                                                 make_cabinet: CabinetFactory) -> None:
    backlog = 8000
    prefill_ledger(tmp_path / "cab", backlog)
    # no resend for want of acks within the test: every resend it sees is the command's
    cab = make_cabinet(auto_ack=False, assign_lanes=False, timings=replace(Timings.fast(), ack_timeout_s=60.0))
    p = cab.platform
    assert p is not None
    tap = RecordsTap(cab)
    try:
        last = int(control_status(cab)["last_seq"])
        assert last >= backlog + 1                          # the backlog, agent_started, catalog_installed

        # Acks withheld: one window goes out, not the ledger.
        p.wait_contiguous(WINDOW, 20)
        barrier(cab)
        assert max(p.records) == WINDOW, max(p.records)

        mark = tap.mark()
        reply = p.wait_reply(p.send_command("resend", {"from_seq": 1}), 15)
        assert reply["ok"] is True and reply["result"]["from_seq"] == 1, reply
        tap.wait_for(lambda: len(set(tap.seqs(mark))) >= WINDOW, 20, "the window resent")
        barrier(cab, tap)
        resent = tap.seqs(mark)
        assert max(resent) == WINDOW and set(resent) == set(range(1, WINDOW + 1)), (min(resent), max(resent))
        assert max(p.records) == WINDOW
        st = cabinetctl_status(cab)
        assert st["acked_upto"] == 0 and st["unsynced"] == st["last_seq"] == last, st

        # Acked: the rest arrives, nothing lost.
        p.set_auto_ack(True)
        assert wait_all_acked(cab, 30) == last

        # A resend from seq 1 of a ledger the platform has acked (below the ack watermark) is
        # still one window: the window counts from what is known to be with the platform.
        p.set_auto_ack(False)
        tap.wait_for(lambda: max(tap.seqs()) >= last, 10, "the tap caught up")
        mark = tap.mark()
        dups = p.duplicates
        reply = p.wait_reply(p.send_command("resend", {"from_seq": 1}), 15)
        assert reply["ok"] is True, reply
        p.wait_for(lambda: p.duplicates - dups >= WINDOW, 20, "the window resent below the ack watermark")
        barrier(cab, tap)
        resent = tap.seqs(mark)
        assert resent == list(range(1, WINDOW + 1)), (len(resent), resent[:3], resent[-3:])
        assert p.duplicates - dups == WINDOW

        p.ack(last)
        assert int(control_status(cab)["last_seq"]) == last
        assert_nothing_lost(cab)
    finally:
        tap.stop()


# -- 2. the daemon exits 1 when its core thread died ----------------------------------------------------


def test_a_daemon_whose_core_thread_died_exits_1_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   make_cabinet: CabinetFactory) -> None:
    # _beat runs in the core loop after every healthy step, outside its catch-all: an exception
    # there ends the core thread
    trigger = induce_fault(monkeypatch, tmp_path, "agent.core:Core._beat")
    cab = make_cabinet()
    p = cab.platform
    assert p is not None and cab.agent is not None
    synced = wait_all_acked(cab)
    p.set_auto_ack(False)                                   # what follows is recorded, not yet synced
    sid = cab.shop(1, {"A1": 1}, shopper="before-the-fault")
    last = int(control_status(cab)["last_seq"])
    assert last > synced and control_status(cab)["unsynced"] == last - synced

    agent = cab.agent
    trigger.touch()
    rc = agent.wait(15)
    cab.agent = None
    assert not trigger.exists()                             # the induced fault is what ended it
    assert rc == 1, rc
    text = agent_log(cab)
    assert "the core thread died; stopping so that systemd restarts the agent" in text, text[-3000:]
    assert "fault induced by the test in Core._beat" in text
    p.wait_for(lambda: (p.status or {}).get("online") is False, 10, "the offline status")

    # Nothing recorded is lost: the stopped daemon's ledger verifies and holds the unsynced sale.
    verify = cab.ctl("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    records = json.loads(cab.ctl("sales", "--json").stdout)
    assert max(r["seq"] for r in records) == last
    assert [r["body"]["session_id"] for r in records if r["type"] == "sale"] == [sid]

    # systemd would restart it: the backlog is synced, each sale exactly once.
    p.set_auto_ack(True)
    cab.start_agent()
    wait_all_acked(cab)
    assert [s["session_id"] for s in p.sales()] == [sid]
    assert len(p.events("agent_started")) == 2
    assert_nothing_lost(cab)


# -- 3. the link restarts a dead network loop ----------------------------------------------------------


def test_the_link_restarts_its_dead_network_loop_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   make_cabinet: CabinetFactory) -> None:
    # an exception out of paho's read (a parser bug, an unexpected packet) ends the network loop
    trigger = induce_fault(monkeypatch, tmp_path, "agent.mqtt_client:LinkClient.loop_read")
    cab = make_cabinet()
    p = cab.platform
    assert p is not None and cab.agent is not None
    first = cab.shop(1, {"A1": 1}, shopper="before")
    wait_all_acked(cab)
    statuses = len(p.statuses)

    trigger.touch()
    # the next byte the link reads (this command, at the latest) raises in its network loop
    cid = p.send_command("status", {})
    wait_until(lambda: not trigger.exists(), 10, "the induced fault in the network loop")
    # recorded while the link is down or coming back
    for state in ("on", "off"):
        out = cab.ctl("service", state)
        assert out.returncode == 0, (out.stdout, out.stderr)

    reply = p.wait_reply(cid, 20)                           # delivered from the persistent session
    assert reply["ok"] is True, reply
    # the broker published the Last Will when the dead loop's socket closed, then we came back
    p.wait_for(lambda: any(s.get("online") is False for s in p.statuses[statuses:]), 10, "the Last Will")
    p.wait_for(lambda: (p.status or {}).get("online") is True, 15, "online again")
    text = agent_log(cab)
    assert "fault induced by the test in LinkClient.loop_read" in text, text[-3000:]
    assert "the mqtt network loop failed; reconnecting" in text, text[-3000:]
    assert cab.agent.poll() is None

    # the link works: a command answered, a sale and the events synced
    barrier(cab)
    second = cab.shop(2, {"B2": 1}, shopper="after")
    wait_all_acked(cab)
    assert [s["session_id"] for s in p.sales()] == [first, second]
    assert [e["on"] for e in p.events("service_mode")] == [True, False]
    assert_nothing_lost(cab)


# -- 4. a catalog whose unit weight overflows to infinity ----------------------------------------------


def test_a_signed_catalog_with_unit_weight_1e400_is_rejected_and_the_old_one_stays(
        tmp_path: Path, cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    p = cab.platform
    assert p is not None
    before = request(str(cab.workdir / "control.sock"), "catalog", timeout_s=10)["result"]
    assert before["version"] == 1 and before["products"] == len(DEMO_PRODUCTS), before
    seq = int(control_status(cab)["last_seq"])

    # 1e400 is a valid JSON number that reads as infinity; a platform whose JSON reads it so signs
    # the canonical form of infinity: the document is signed as well as it can be.
    products = [dict(DEMO_PRODUCTS[0], unit_weight_g=float("inf")), *DEMO_PRODUCTS[1:]]
    doc = p.make_catalog(2, products)
    wire = json.dumps(doc).replace("Infinity", "1e400").encode()
    assert b"1e400" in wire and json.loads(wire)["products"][0]["unit_weight_g"] == float("inf")
    p.publish_catalog(wire, "snapshot")

    rejected = wait_event(cab, "catalog_rejected", after=seq)
    body = rejected["body"]
    assert body["reason"] == "invalid" and body["version"] in (None, 2), body

    # The same document from a USB stick: refused with the reason, no internal error.
    path = tmp_path / "catalog-1e400.json"
    path.write_bytes(wire)
    out = cab.ctl("catalog", "install", str(path))
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "invalid" in out.stderr and "internal error" not in out.stderr + out.stdout, out.stderr
    assert wait_event(cab, "catalog_rejected", after=rejected["seq"], timeout=10)["body"] == body

    # The previous catalog is in force: same version and products, a certified product is still
    # accepted in a lane and sold, and the daemon logged no internal error.
    assert ctl_json(cab, "catalog") == before
    assert (p.status or {}).get("catalog_version") == 1
    cab.command_ok("set_lane", {"lane": "A1", "gtin": DEMO_PRODUCTS[0]["gtin"], "price_cents": 1590})
    sid = cab.shop(1, {"A1": 1})
    sale = cab.wait_session_end(sid)
    assert sale["type"] == "sale" and [i["qty"] for i in sale["body"]["items"]] == [1]
    assert sale["body"]["items"][0]["gtin"] == DEMO_PRODUCTS[0]["gtin"]
    text = agent_log(cab)
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    assert cab.agent is not None and cab.agent.poll() is None
    wait_all_acked(cab)
    assert_nothing_lost(cab)
