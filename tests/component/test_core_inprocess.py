"""``Core`` in-process: fake ports, a manual clock, real SQLite files; no thread, broker or pty.

Each test posts inbox items (``core.handle``) and runs the core's step, then asserts on what
the fakes were asked to do and on what the ledger holds.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.clock import ManualClock
from agent.config import Config, parse_config
from agent.core import HOUSEKEEPING_S, SEEN_EXTRA_S, Core
from agent.events import (
    ChannelState,
    DeviceFault,
    DeviceKind,
    DeviceRecovered,
    DoorFeedback,
    Inbound,
    LockProbed,
    ScaleCycle,
    UnlockDone,
)
from agent.ports import Ports
from agent.protocol import Alarm, canonical, public_key_b64, sign, ts_from_epoch

KEY = Ed25519PrivateKey.generate()
GTIN = "06901234567892"
UNIT_G = 250.0


class FakeLink:
    def __init__(self) -> None:
        self.connected = True
        self.published: list[tuple[str, bytes, bool]] = []
        self.resubscribed: list[str] = []
        self.acked: list[Any] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        self.published.append((topic, payload, retain))
        return len(self.published)

    def resubscribe(self, topic: str) -> None:
        self.resubscribed.append(topic)

    def ack(self, msg: Inbound) -> None:
        self.acked.append(msg.ack)

    def replies(self) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.published if t.endswith("/cmd/reply")]


class FakeLockBoard:
    """Records unlocks, and what the ledger's journal held at the moment of each (rule 1)."""

    def __init__(self) -> None:
        self.unlocks: list[tuple[int, str]] = []
        self.journal_at_unlock: list[list[str]] = []
        self.probes = 0
        self.core: Core | None = None

    def probe(self) -> None:
        self.probes += 1

    def unlock(self, lock: int, token: str) -> None:
        self.unlocks.append((lock, token))
        assert self.core is not None
        self.journal_at_unlock.append([r["session_id"] for r in self.core.ledger.active_sessions()])


class FakeCatalogInstaller:
    def __init__(self) -> None:
        self.submitted: list[tuple[bytes, str]] = []

    def submit_bytes(self, data: bytes, source: str) -> None:
        self.submitted.append((data, source))


def make_config(data_dir: Path) -> Config:
    return parse_config({
        "cabinet": {"id": "CAB-0001", "data_dir": str(data_dir), "control_socket": str(data_dir / "ctl.sock")},
        "platform": {"public_key": public_key_b64(KEY)},
        "scale": {"settle_s": 1.0},
        "doors": [{"door": 1, "lock": 1}],
        "lanes": [{"lane": "A1", "door": 1, "channel": 1}, {"lane": "A2", "door": 1, "channel": 2}],
        "camera": {"source": ""},
    })


class Cabinet:
    """A Core with fakes around it, and the few moves a test makes."""

    def __init__(self, data_dir: Path, clock: ManualClock | None = None) -> None:
        self.clock = clock or ManualClock()
        self.link = FakeLink()
        self.lockboard = FakeLockBoard()
        self.installer = FakeCatalogInstaller()
        self.cfg = make_config(data_dir)
        self.core = Core(self.cfg, ports=Ports(self.link, self.lockboard, self.installer), clock=self.clock)
        self.lockboard.core = self.core
        self.core.start()
        self.weights = {1: 1000.0, 2: 500.0}

    def feed(self, door_open: bool | None, *, stable: bool = True) -> None:
        """One poll of the lock board and one scale cycle, at the current time."""
        now = self.clock.monotonic()
        states = None if door_open is None else {1: door_open}
        self.core.handle(ScaleCycle({ch: ChannelState(g, stable) for ch, g in self.weights.items()}, now))
        self.core.handle(DoorFeedback(states, now))
        self.core.step()

    def run(self, seconds: float, door_open: bool | None, *, stable: bool = True, tick: float = 0.25) -> None:
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end:
            self.clock.advance(tick)
            self.feed(door_open, stable=stable)

    def command(self, type_: str, args: dict[str, Any], cid: str | None = None) -> str:
        cid = cid or str(uuid.uuid4())
        wall = self.clock.wall()
        obj = sign({"id": cid, "type": type_, "issued_at": ts_from_epoch(wall),
                    "expires_at": ts_from_epoch(wall + 60), "args": args}, KEY)
        self.core.handle(Inbound(self.core.topics.cmd, canonical(obj)))
        self.core.step()
        return cid

    def open_door(self, session_id: str | None = None, cid: str | None = None) -> str:
        return self.command("open_door", {"door": 1, "session_id": session_id or str(uuid.uuid4()),
                                          "shopper": "ref-1", "auth": "face"}, cid)

    def confirm_unlock(self) -> None:
        lock, token = self.lockboard.unlocks[-1]
        self.core.handle(UnlockDone(lock, token, True, self.clock.monotonic()))

    def reply(self, cid: str) -> dict[str, Any]:
        return next(r for r in self.core_replies() if r["id"] == cid)

    def core_replies(self) -> list[dict[str, Any]]:
        return self.link.replies()

    def records(self) -> list[dict[str, Any]]:
        return [r.wire() for r in self.core.ledger.records(newest_first=False)]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.records() if r["type"] == "event" and r["body"]["kind"] == kind]

    def sales(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.records() if r["type"] == "sale"]

    def stock_lane(self) -> None:
        """A certified catalog is installed and A1 holds its product (250 g, 990 cents)."""
        product = {"gtin": GTIN, "name": "Dried shiitake 250 g", "producer": "Co-op", "origin": "Xiangxi",
                   "cert_id": "PA-1", "valid_from": "2020-01-01", "valid_until": "2099-12-31",
                   "unit_weight_g": UNIT_G, "weight_tolerance_g": 5.0}
        doc = sign({"version": 1, "base_version": None, "issued_at": self.clock.now_ts(), "products": [product],
                    "revoked": []}, KEY)
        assert self.core.catalog.install_bytes(canonical(doc)).outcome == "installed"
        self.core.assign_lane("A1", GTIN, 990)


@pytest.fixture
def cab(tmp_path: Path) -> Cabinet:
    c = Cabinet(tmp_path / "data")
    c.feed(False)
    return c


def test_open_door_happy_path_journals_before_unlocking(cab: Cabinet) -> None:
    session_id = str(uuid.uuid4())
    cid = cab.open_door(session_id)
    assert cab.lockboard.unlocks == [(1, session_id)]
    assert cab.lockboard.journal_at_unlock == [[session_id]]   # rule 1: committed before the frame
    cab.confirm_unlock()
    assert cab.reply(cid) == {"id": cid, "ok": True, "at": cab.reply(cid)["at"], "error": None,
                              "result": {"session_id": session_id, "door": 1, "unlocked": True}}
    assert cab.core.status()["mode"] == "session"


def test_second_open_door_on_a_busy_door_is_refused(cab: Cabinet) -> None:
    cab.open_door()
    second = cab.open_door()
    assert len(cab.lockboard.unlocks) == 1
    reply = cab.reply(second)
    assert reply["ok"] is False and "busy" in reply["error"]
    assert cab.events("command_rejected")[-1]["command_id"] == second


def test_open_door_waits_for_stable_lanes_then_is_refused(tmp_path: Path) -> None:
    cab = Cabinet(tmp_path / "data")
    cab.feed(False, stable=False)
    cid = cab.open_door()
    assert cab.lockboard.unlocks == [] and cab.core_replies() == []   # waiting, not refused yet
    cab.run(5.0, False, stable=False)
    assert cab.lockboard.unlocks == []
    reply = cab.reply(cid)
    assert reply["ok"] is False and reply["error"] == "not_allowed: the scales are not stable"


def test_another_command_under_the_id_of_a_waiting_open_door_is_a_replay(tmp_path: Path) -> None:
    cab = Cabinet(tmp_path / "data")
    cab.feed(False, stable=False)
    cid = cab.open_door()                       # waits for stable lanes
    cab.open_door(cid=cid)                      # the same id, another session: not a redelivery
    replies = cab.core_replies()
    assert len(replies) == 1 and replies[0]["id"] == cid and replies[0]["error"].startswith("replay")
    cab.run(1.0, False, stable=True)
    assert len(cab.lockboard.unlocks) == 1      # the first one still gets its session
    assert [r["ok"] for r in cab.core_replies() if r["id"] == cid] == [False]   # unlock not confirmed yet
    cab.confirm_unlock()
    assert [r["ok"] for r in cab.core_replies() if r["id"] == cid] == [False, True]


def test_open_door_that_waited_starts_once_the_lanes_are_stable(tmp_path: Path) -> None:
    cab = Cabinet(tmp_path / "data")
    cab.feed(False, stable=False)
    cab.open_door()
    cab.run(1.0, False, stable=True)
    assert len(cab.lockboard.unlocks) == 1


def test_settle_records_one_sale_against_the_baseline(cab: Cabinet) -> None:
    cab.stock_lane()
    session_id = str(uuid.uuid4())
    cab.open_door(session_id)
    cab.confirm_unlock()
    cab.run(1.5, True)                 # past the latch window: the door is open
    cab.weights[1] -= 2 * UNIT_G + 1.0    # two items taken
    cab.run(0.5, True, stable=False)
    cab.run(2.0, False)                # shut, stable for settle_s
    sales = cab.sales()
    assert len(sales) == 1
    sale = sales[0]
    assert sale["session_id"] == session_id and sale["shopper"] == "ref-1"
    assert [(i["lane"], i["gtin"], i["qty"], i["unit_price_cents"]) for i in sale["items"]] == [("A1", GTIN, 2, 990)]
    assert sale["total_cents"] == 1980 and sale["flags"] == []
    assert cab.core.ledger.active_sessions() == []
    assert cab.core.status()["mode"] == "ready"


def test_a_session_with_nothing_taken_is_session_empty(cab: Cabinet) -> None:
    cab.open_door()
    cab.confirm_unlock()
    cab.run(1.5, True)
    cab.run(2.0, False)
    assert cab.sales() == [] and len(cab.events("session_empty")) == 1


def test_ledger_unwritable_refuses_sessions_raises_the_alarm_and_keeps_events(cab: Cabinet) -> None:
    cab.core.ledger.execute("PRAGMA query_only = ON")     # the real ledger now refuses every write
    cab.core.handle(DeviceFault(DeviceKind.SCALE, 7, "timeout"))    # an event that cannot be written now
    assert not cab.core.recorder.writable
    assert Alarm.LEDGER_UNWRITABLE in cab.core.status()["alarms"]
    assert cab.core.status()["mode"] == "fault"
    cid = cab.open_door()
    assert cab.lockboard.unlocks == []
    assert cab.reply(cid)["error"] == "not_allowed: the ledger cannot accept records"
    last_seq = cab.core.ledger.last_seq

    cab.core.ledger.execute("PRAGMA query_only = OFF")    # the disk is back
    cab.clock.advance(HOUSEKEEPING_S + 1)
    cab.core.step()
    assert cab.core.recorder.writable
    assert Alarm.LEDGER_UNWRITABLE not in cab.core.status()["alarms"]
    kinds = [r["body"]["kind"] for r in cab.records() if r["seq"] > last_seq]
    assert kinds[:2] == ["scale_fault", "command_rejected"]   # what waited is written, in order
    assert cab.core.ledger.verify()[0] is None
    cab.open_door()
    assert len(cab.lockboard.unlocks) == 1


def test_service_mode_refuses_open_door(cab: Cabinet) -> None:
    cab.core.state.service_mode = True
    cid = cab.open_door()
    assert cab.lockboard.unlocks == []
    assert cab.reply(cid)["error"] == "not_allowed: the cabinet is in service mode"
    assert cab.core.status()["mode"] == "service"


def test_resume_from_the_journal_never_unlocks_again(tmp_path: Path) -> None:
    first = Cabinet(tmp_path / "data")
    first.feed(False)
    first.stock_lane()
    session_id = str(uuid.uuid4())
    first.open_door(session_id)
    first.confirm_unlock()
    first.run(1.5, True)
    first.weights[1] -= UNIT_G
    first.core.finish()          # a crash: the session is journaled, the door is open

    second = Cabinet(tmp_path / "data", clock=first.clock)
    second.weights = dict(first.weights)
    assert [m.session.session_id for m in second.core.state.doors.values() if m.session] == [session_id]
    second.run(2.0, False)
    assert second.lockboard.unlocks == []
    sales = second.sales()
    assert len(sales) == 1 and sales[0]["session_id"] == session_id
    assert [(i["lane"], i["qty"]) for i in sales[0]["items"]] == [("A1", 1)]


def test_device_faults_dispatch_by_kind(cab: Cabinet) -> None:
    cab.core.handle(DeviceFault(DeviceKind.LOCKBOARD, 1, "no answer"))
    cab.core.handle(DeviceFault(DeviceKind.SCALE, 2, "timeout"))
    cab.core.handle(DeviceFault(DeviceKind.CAMERA, None, "no frames"))
    alarms = cab.core.status()["alarms"]
    assert {Alarm.LOCK_FAULT, Alarm.scale_fault(2), Alarm.CAMERA_FAULT} <= set(alarms)
    cab.core.handle(DeviceRecovered(DeviceKind.SCALE, 2))
    assert Alarm.scale_fault(2) not in cab.core.status()["alarms"]
    assert cab.events("lock_fault")[-1] == {"kind": "lock_fault", "board": 1, "detail": "no answer"}
    assert cab.events("camera_fault")[-1] == {"kind": "camera_fault", "detail": "no frames"}
    assert cab.events("hardware_recovered")[-1] == {"kind": "hardware_recovered", "device": "scale", "channel": 2}


def test_status_reports_an_unknown_door_while_the_board_is_silent(cab: Cabinet) -> None:
    cab.feed(None)
    assert cab.core.status()["doors"] == [{"door": 1, "open": None, "locked": None}]


def test_catalog_documents_go_to_the_installer(cab: Cabinet) -> None:
    cab.core.handle(Inbound("cab/v1/catalog", b'{"version": 1}'))
    cab.core.handle(Inbound("cab/v1/catalog", b""))        # a cleared retained message
    assert cab.installer.submitted == [(b'{"version": 1}', "cab/v1/catalog")]


# -- v1.1 fault rules ------------------------------------------------------------------------------------
def test_doors_are_unknown_as_soon_as_the_lock_board_is_faulted(cab: Cabinet) -> None:
    assert cab.core.status()["doors"] == [{"door": 1, "open": False, "locked": True}]
    cab.core.handle(DeviceFault(DeviceKind.LOCKBOARD, 1, "no answer"))
    assert cab.core.status()["doors"] == [{"door": 1, "open": None, "locked": None}]


def test_open_door_during_a_lock_fault_asks_the_board_and_goes_ahead_when_it_answers(cab: Cabinet) -> None:
    cab.core.handle(DeviceFault(DeviceKind.LOCKBOARD, 1, "line noise"))
    cid = cab.open_door()
    assert cab.lockboard.probes == 1 and cab.lockboard.unlocks == [] and cab.core_replies() == []
    cab.core.handle(DeviceRecovered(DeviceKind.LOCKBOARD, 1))     # what the probe's good answer posts
    cab.feed(False)
    cab.core.handle(LockProbed(True, cab.clock.monotonic()))
    cab.core.step()
    assert len(cab.lockboard.unlocks) == 1
    cab.confirm_unlock()
    assert cab.reply(cid)["ok"] is True
    assert cab.events("hardware_recovered")[-1]["device"] == "lockboard"


def test_open_door_during_a_lock_fault_is_refused_when_the_board_stays_silent(cab: Cabinet) -> None:
    cab.core.handle(DeviceFault(DeviceKind.LOCKBOARD, 1, "no answer"))
    cid = cab.open_door()
    cab.core.handle(LockProbed(False, cab.clock.monotonic()))
    assert cab.lockboard.unlocks == []
    assert cab.reply(cid)["error"] == "not_allowed: the lock board is not answering"


def test_a_lane_whose_scale_faults_before_the_door_shuts_is_a_flagged_item(cab: Cabinet) -> None:
    cab.stock_lane()
    session_id = str(uuid.uuid4())
    cab.open_door(session_id)
    cab.confirm_unlock()
    cab.run(1.5, True)
    cab.core.handle(DeviceFault(DeviceKind.SCALE, 1, "timeout"))   # lane A1's transmitter
    cab.weights[1] = None  # type: ignore[assignment]   # what the scale thread reports while faulted
    cab.run(40.0, False, stable=False, tick=1.0)                 # the wait for stable lanes is bounded
    sales = cab.sales()
    assert len(sales) == 1 and sales[0]["session_id"] == session_id
    a1 = next(i for i in sales[0]["items"] if i["lane"] == "A1")
    assert a1["qty"] == 0 and a1["weight_g"] is None and a1["flags"] == ["weight_mismatch"]
    assert "weight_mismatch" in sales[0]["flags"] and sales[0]["total_cents"] == 0


def test_a_wall_clock_jump_is_recorded_and_does_not_reopen_replays(cab: Cabinet) -> None:
    captured = {"id": str(uuid.uuid4()), "type": "status", "args": {}}
    wall = cab.clock.wall()
    signed = sign({**captured, "issued_at": ts_from_epoch(wall), "expires_at": ts_from_epoch(wall + 60)}, KEY)
    cab.core.handle(Inbound(cab.core.topics.cmd, canonical(signed)))
    assert cab.reply(captured["id"])["ok"] is True
    seq_before = cab.core.ledger.last_seq
    cab.clock.jump_wall(3600)                       # forward an hour, housekeeping runs
    cab.clock.advance(HOUSEKEEPING_S + 1)
    cab.core.step()
    assert [b["delta_s"] for b in cab.events("clock_jump")] == [3600.0]
    cab.clock.jump_wall(-3600)                      # and back
    cab.clock.advance(HOUSEKEEPING_S + 1)
    cab.core.step()
    assert len(cab.events("clock_jump")) == 2
    cab.core.handle(Inbound(cab.core.topics.cmd, canonical(signed)))   # the captured command again
    replies = [r for r in cab.core_replies() if r["id"] == captured["id"]]
    assert replies[-1]["ok"] is False and replies[-1]["error"].startswith("replay")
    assert cab.core.ledger.last_seq > seq_before   # seq and chain go on
    assert cab.core.ledger.verify()[0] is None
    assert SEEN_EXTRA_S >= 86400


# -- v1.1 bounds on refusals ----------------------------------------------------------------------------------
def test_a_flood_of_garbage_costs_bounded_records_and_replies(cab: Cabinet) -> None:
    seq = cab.core.ledger.last_seq
    for i in range(2000):
        cab.core.handle(Inbound(cab.core.topics.cmd, b"not json %d" % i))
    cab.core.step()
    rejected = [r for r in cab.records() if r["seq"] > seq and r["body"].get("kind") == "command_rejected"]
    assert len(rejected) == 60
    assert len(cab.core_replies()) == 60 and all(r["id"] is None for r in cab.core_replies())
    cab.clock.advance(61)
    cab.core.step()
    suppressed = cab.events("rejections_suppressed")
    assert [(b["what"], b["count"]) for b in suppressed] == [("command", 1940)]
    cid = cab.open_door()              # a valid command is never delayed by the flood
    assert len(cab.lockboard.unlocks) == 1 and cid not in [r["id"] for r in cab.core_replies()]


def test_a_command_id_longer_than_64_characters_is_refused_with_id_null(cab: Cabinet) -> None:
    cab.command("status", {}, cid="x" * 10_000)
    reply = cab.core_replies()[-1]
    assert reply["id"] is None and reply["ok"] is False and "64 characters" in reply["error"]
    assert len(reply["error"]) <= 200
    assert cab.events("command_rejected")[-1]["command_id"] is None


# -- v1.1: a command is acknowledged on the wire only once its outcome is committed -------------------------
def _held(cab: Cabinet, type_: str, args: dict[str, Any], token: object) -> str:
    cid = str(uuid.uuid4())
    wall = cab.clock.wall()
    obj = sign({"id": cid, "type": type_, "issued_at": ts_from_epoch(wall), "expires_at": ts_from_epoch(wall + 60),
                "args": args}, KEY)
    cab.core.handle(Inbound(cab.core.topics.cmd, canonical(obj), ack=token))  # type: ignore[arg-type]
    return cid


def test_an_open_door_is_acked_once_its_session_is_journaled(cab: Cabinet) -> None:
    _held(cab, "open_door", {"door": 1, "session_id": str(uuid.uuid4()), "shopper": "r", "auth": "qr"}, "t1")
    assert cab.link.acked == ["t1"] and len(cab.core.ledger.active_sessions()) == 1


def test_a_waiting_open_door_is_acked_only_when_it_starts_and_is_not_yet_seen(tmp_path: Path) -> None:
    cab = Cabinet(tmp_path / "data")
    cab.feed(False, stable=False)
    cid = _held(cab, "open_door", {"door": 1, "session_id": str(uuid.uuid4()), "shopper": "r", "auth": "qr"}, "t2")
    assert cab.link.acked == [] and not cab.core.ledger.command_seen(cid)   # a crash now: delivered again
    cab.run(1.0, False, stable=True)
    assert cab.link.acked == ["t2"] and len(cab.lockboard.unlocks) == 1


def test_a_refused_command_is_acked_after_its_rejection_is_recorded(cab: Cabinet) -> None:
    cab.core.state.service_mode = True
    cid = _held(cab, "open_door", {"door": 1, "session_id": str(uuid.uuid4()), "shopper": "r", "auth": "qr"}, "t3")
    assert cab.link.acked == ["t3"] and cab.events("command_rejected")[-1]["command_id"] == cid
