"""Broker and network faults (issue 8): the broker goes away while sessions go on, and comes back
with its persistence or without it (then the agent's session and subscriptions are gone: it must
subscribe again and resend); a link that silently stops carrying packets (a half-open TCP
connection). Nothing recorded is lost, nothing is stored twice, and a command and the acks work
afterwards.

Real parts only: the daemon as a subprocess, Mosquitto, the simulators on ptys, the reference
platform, and for the partition a TCP relay of our own between the agent and the broker.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import agent.sim.cabinet as cabinet_module
from agent.control import request
from agent.sim.broker import PrivateBroker
from agent.sim.cabinet import SimulatedCabinet, Timings
from drivers.lockboard.codec import UnlockRequest
from helpers import wait_until

pytestmark = pytest.mark.timeout(180)

TIMINGS = Timings(latch_release_s=0.15, settle_s=0.3, open_timeout_s=10.0, door_open_alarm_s=60.0,
                  ack_timeout_s=3.0, reconnect_spread_s=0.5)
OUTAGE_S = 3.0   # how long the broker stays away (the fault itself)


# -- harness ----------------------------------------------------------------------------------------------


class Shopper:
    """Pulls a door open the moment its latch is released (the board simulator's on_unlock)."""

    def __init__(self) -> None:
        self.cab: SimulatedCabinet | None = None

    def __call__(self, lock: int) -> None:
        if self.cab is not None and self.cab.lockboard is not None:
            self.cab.lockboard.open_door(lock)


def build_cabinet(workdir: Path, *, persistence: bool, config_extra: dict[str, Any] | None = None,
                 monkeypatch: pytest.MonkeyPatch) -> SimulatedCabinet:
    real_broker = cabinet_module.PrivateBroker
    if persistence:
        store = workdir / "mosquitto-persistence"

        def persistent_broker(*args: Any, **kwargs: Any) -> PrivateBroker:
            kwargs.setdefault("persistence_dir", store)
            return real_broker(*args, **kwargs)

        monkeypatch.setattr(cabinet_module, "PrivateBroker", persistent_broker)
    shopper = Shopper()
    cab = SimulatedCabinet(workdir / "cab", cabinet_id="CAB-NET", timings=TIMINGS, on_unlock=shopper,
                           config_extra=config_extra)
    shopper.cab = cab
    return cab


def status(cab: SimulatedCabinet) -> dict[str, Any] | None:
    """The daemon's status over its control socket; None while it cannot answer."""
    try:
        answer = request(str(cab.workdir / "control.sock"), "status", timeout_s=5)
    except OSError:
        return None
    return answer.get("result") if answer.get("ok") else None


def control(cab: SimulatedCabinet, cmd: str, args: dict[str, Any] | None = None) -> Any:
    answer = request(str(cab.workdir / "control.sock"), cmd, args, timeout_s=10)
    assert answer.get("ok"), answer
    return answer["result"]


def ledger_rows(cab: SimulatedCabinet) -> list[tuple[int, str, str]]:
    """(seq, hash, body) of every record in the agent's ledger, read-only."""
    path = cab.workdir / "data" / "ledger.db"
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=2)) as ro:
        return ro.execute("SELECT seq, hash, body FROM records ORDER BY seq").fetchall()


def session_state(cab: SimulatedCabinet, session_id: str) -> str | None:
    path = cab.workdir / "data" / "ledger.db"
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=2)) as ro:
        row = ro.execute("SELECT state FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    return row[0] if row else None


def unlock_frames(cab: SimulatedCabinet, lock: int) -> int:
    assert cab.lockboard is not None
    frame = UnlockRequest(1, lock).to_bytes()
    return sum(1 for _t, f in list(cab.lockboard.received) if f == frame)


def session_records(cab: SimulatedCabinet, session_id: str) -> list[dict[str, Any]]:
    assert cab.platform is not None
    return [r for r in cab.platform.records_in_order() if r["body"].get("session_id") == session_id
            and (r["type"] == "sale" or r["body"].get("kind") in ("session_empty", "session_timeout"))]


def open_session(cab: SimulatedCabinet, door: int) -> str:
    """open_door accepted and the door seen open by the agent (the shopper pulled it at the unlock)."""
    session_id = cab.authorize(door, f"shopper-{uuid.uuid4().hex[:6]}")
    cab.wait_door_seen_open(door)
    return session_id


def everything_delivered_and_acked(cab: SimulatedCabinet, timeout: float = 60.0) -> int:
    """The platform holds every ledger record, hash for hash, and the agent has nothing unsynced."""
    assert cab.platform is not None
    platform = cab.platform
    rows = ledger_rows(cab)
    last = rows[-1][0]
    platform.wait_contiguous(last, timeout)
    wait_until(lambda: (status(cab) or {}).get("unsynced") == 0, timeout, "0 unsynced records")
    held = {r["seq"]: r["hash"] for r in platform.records_in_order()}
    for seq, digest, _body in ledger_rows(cab):
        assert held.get(seq) == digest, f"ledger record {seq} is not on the platform as it is in the ledger"
    assert sorted(held) == list(range(1, len(held) + 1))
    assert platform.chain_errors == [] and platform.errors == 0, (platform.chain_errors, platform.error_messages)
    return last


def shop_once_more(cab: SimulatedCabinet) -> None:
    """After the fault: a command goes through, the sale is delivered and acknowledged."""
    assert cab.lockboard is not None
    unlocks = unlock_frames(cab, 2)
    session_id = open_session(cab, 2)
    cab.take("B1", 1)
    cab.lockboard.close_door(2)
    rec = cab.wait_session_end(session_id, timeout=30)
    assert rec["type"] == "sale" and [(i["lane"], i["qty"]) for i in rec["body"]["items"]] == [("B1", 1)]
    assert unlock_frames(cab, 2) == unlocks + 1
    everything_delivered_and_acked(cab)


# -- broker down while sessions go on ------------------------------------------------------------------------


# "kill" with persistence: Mosquitto saves only on a clean stop (or every autosave_interval, 30 min), so a
# killed broker comes back with what it saved last, here nothing: sessions, subscriptions, retained status.
@pytest.mark.parametrize(("how", "persistence"), [("stop", True), ("stop", False), ("kill", True), ("kill", False)],
                         ids=["stopped-persistent", "stopped-no-persistence", "killed-persistent",
                              "killed-no-persistence"])
def test_broker_outage_during_sessions_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str,
                                                     persistence: bool) -> None:
    cab = build_cabinet(tmp_path, persistence=persistence, monkeypatch=monkeypatch)
    try:
        cab.start()
        assert cab.broker is not None and cab.platform is not None and cab.lockboard is not None
        broker, platform = cab.broker, cab.platform
        everything_delivered_and_acked(cab)

        # a session is under way when the broker goes
        inside = open_session(cab, 1)
        unlocks_1 = unlock_frames(cab, 1)
        if how == "stop":
            broker.stop()
        else:
            broker.kill()
        wait_until(lambda: (status(cab) or {}).get("broker_connected") is False, 30, "the agent seeing the link down")

        # meanwhile the shopper finishes, and the cabinet records more: all of it offline
        cab.take("A1", 2)
        cab.lockboard.close_door(1)
        wait_until(lambda: session_state(cab, inside) == "ended", 30, "the sale committed offline")
        for i in range(6):
            control(cab, "service", {"on": i % 2 == 0})
        offline_last = ledger_rows(cab)[-1][0]
        time.sleep(OUTAGE_S)   # the broker stays away a while longer (the outage itself)

        broker.start()   # same port; with or without the sessions it had
        platform.wait_ready(30)
        wait_until(lambda: (status(cab) or {}).get("broker_connected") is True, 60, "the agent reconnected")

        # everything recorded offline arrives once, in a chain that verifies
        platform.wait_contiguous(offline_last, 60)
        (sale,) = session_records(cab, inside)
        assert sale["type"] == "sale" and [(i["lane"], i["qty"]) for i in sale["body"]["items"]] == [("A1", 2)]
        assert [e["on"] for e in platform.events("service_mode")][-6:] == [True, False] * 3
        assert unlock_frames(cab, 1) == unlocks_1
        platform.wait_for(lambda: (platform.status or {}).get("online") is True, 30, "status online again")
        everything_delivered_and_acked(cab)

        # and the link works both ways afterwards: a command, a sale, its ack
        shop_once_more(cab)
    finally:
        cab.stop()


def test_command_queued_for_a_dead_agent_survives_a_broker_restart_with_persistence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The platform's open_door waits in the agent's persistent session while the agent is down; the broker
    restarts in between (persistence on): the command is served once the agent is back."""
    cab = build_cabinet(tmp_path, persistence=True, monkeypatch=monkeypatch)
    try:
        cab.start()
        assert cab.broker is not None and cab.platform is not None and cab.lockboard is not None
        everything_delivered_and_acked(cab)
        unlocks = unlock_frames(cab, 1)
        cab.kill_agent()
        session_id = str(uuid.uuid4())
        command_id = cab.platform.send_command("open_door", {"door": 1, "session_id": session_id,
                                                             "shopper": "queued", "auth": "face"})
        cab.broker.restart()
        cab.platform.wait_ready(30)
        cab.start_agent()
        reply = cab.platform.wait_reply(command_id, 30)
        assert reply["ok"] is True, reply
        cab.wait_door_seen_open(1)
        cab.take("A2", 1)
        cab.lockboard.close_door(1)
        rec = cab.wait_session_end(session_id, timeout=30)
        assert rec["type"] == "sale" and [(i["lane"], i["qty"]) for i in rec["body"]["items"]] == [("A2", 1)]
        assert unlock_frames(cab, 1) == unlocks + 1
        everything_delivered_and_acked(cab)
    finally:
        cab.stop()


# -- a silent network: packets dropped, no FIN, no RST ---------------------------------------------------------


class Relay:
    """A TCP relay between the agent and the broker that can go silent: while ``frozen`` it neither
    forwards nor closes anything (a cable pulled somewhere on the way, a NAT that forgot the flow);
    ``thaw()`` drops the stale connections, as the peer's kernel eventually does, and lets new ones pass."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.frozen = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(client)
                self.accepted += 1
            if self.frozen.is_set():
                continue   # held open, never answered
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                while self.frozen.is_set() and not self._stop.is_set():
                    self._stop.wait(0.05)   # the bytes go nowhere while the network is silent
                if self._stop.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        with self._lock:
            stale, self._conns = self._conns, []
        for s in stale:
            with contextlib.suppress(OSError):
                s.close()
        self.frozen.clear()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self.thaw()


@pytest.fixture
def relayed_cabinet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SimulatedCabinet, Relay]]:
    """The agent reaches the broker through the relay (the platform directly); keepalive 5 s (the minimum)."""
    holder: dict[str, Relay] = {}
    real_config: Callable[[SimulatedCabinet], dict[str, Any]] = SimulatedCabinet.config

    def config_through_relay(self: SimulatedCabinet) -> dict[str, Any]:
        cfg = real_config(self)
        assert self.broker is not None
        if "relay" not in holder:
            holder["relay"] = Relay((self.broker.host, self.broker.port))
        cfg["platform"]["port"] = holder["relay"].port
        cfg["platform"]["keepalive_s"] = 5
        return cfg

    monkeypatch.setattr(SimulatedCabinet, "config", config_through_relay)
    shopper = Shopper()
    cab = SimulatedCabinet(tmp_path / "cab", cabinet_id="CAB-PART", timings=TIMINGS, on_unlock=shopper)
    shopper.cab = cab
    try:
        cab.start()
        yield cab, holder["relay"]
    finally:
        cab.stop()
        if "relay" in holder:
            holder["relay"].close()


def test_a_silent_network_is_detected_and_nothing_is_lost(relayed_cabinet: tuple[SimulatedCabinet, Relay]) -> None:
    cab, relay = relayed_cabinet
    assert cab.platform is not None and cab.lockboard is not None
    platform = cab.platform
    everything_delivered_and_acked(cab)
    inside = open_session(cab, 1)
    relay.freeze()
    # the session ends and more is recorded while every packet is swallowed
    cab.take("A1", 1)
    cab.lockboard.close_door(1)
    wait_until(lambda: session_state(cab, inside) == "ended", 30, "the sale committed")
    for i in range(4):
        control(cab, "service", {"on": i % 2 == 0})
    # no FIN, no RST: only the MQTT keepalive (1.5 x 5 s) can tell the agent the link is dead
    wait_until(lambda: (status(cab) or {}).get("broker_connected") is False, 30,
               "the agent noticing the silent link (keepalive)")
    assert not session_records(cab, inside)   # nothing got through meanwhile
    accepted = relay.accepted
    relay.thaw()
    wait_until(lambda: (status(cab) or {}).get("broker_connected") is True, 90, "the agent reconnected")
    assert relay.accepted > accepted
    sale = cab.wait_session_end(inside, timeout=60)
    assert len(session_records(cab, inside)) == 1
    assert sale["type"] == "sale" and [(i["lane"], i["qty"]) for i in sale["body"]["items"]] == [("A1", 1)]
    everything_delivered_and_acked(cab)
    assert [e["on"] for e in platform.events("service_mode")][-4:] == [True, False, True, False]
    shop_once_more(cab)
