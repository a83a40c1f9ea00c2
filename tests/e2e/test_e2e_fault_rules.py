"""Sessions under device faults, through the real daemon, simulators on ptys and a broker
(operations.md sessions rules 8 and 9, mqtt.md Status: unknown doors)."""

from __future__ import annotations

import uuid

import pytest

from agent.sim.cabinet import SimulatedCabinet
from cabinet_helpers import wait_event


@pytest.fixture
def cabinet_id() -> str:
    return "CAB-FAULT"


def _doors(cab: SimulatedCabinet) -> list[dict[str, object]]:
    assert cab.platform
    return list((cab.platform.status or {}).get("doors", []))


def test_doors_are_reported_unknown_while_the_lock_board_is_silent(cabinet: SimulatedCabinet) -> None:
    assert cabinet.lockboard and cabinet.platform
    cabinet.lockboard.set_silent(True)
    wait_event(cabinet, "lock_fault")
    cabinet.platform.wait_for(lambda: all(d["open"] is None and d["locked"] is None for d in _doors(cabinet)), 10,
                              "doors reported unknown")
    assert "lock_fault" in (cabinet.platform.status or {})["alarms"]
    cabinet.lockboard.set_silent(False)
    wait_event(cabinet, "hardware_recovered", device="lockboard")
    cabinet.platform.wait_for(lambda: all(d["open"] is False for d in _doors(cabinet)), 10, "doors known again")


def test_open_door_after_a_fault_that_is_over_goes_ahead(cabinet: SimulatedCabinet) -> None:
    """Rule 8: line noise marked the board faulty; it answers again before the next poll saw it."""
    assert cabinet.lockboard and cabinet.platform
    cabinet.lockboard.set_silent(True)
    wait_event(cabinet, "lock_fault")
    cabinet.lockboard.set_silent(False)          # the fault is over; the agent has not polled since
    sid = str(uuid.uuid4())
    reply = cabinet.command_ok("open_door", {"door": 1, "session_id": sid, "shopper": "s-1", "auth": "qr"})
    assert reply["result"]["unlocked"] is True
    wait_event(cabinet, "hardware_recovered", device="lockboard")
    assert cabinet.lockboard.open_door(1)
    cabinet.wait_door_seen_open(1)
    cabinet.take("A1", 1)
    cabinet.lockboard.close_door(1)
    end = cabinet.wait_session_end(sid)
    assert end["type"] == "sale" and [i["qty"] for i in end["body"]["items"]] == [1]


def test_open_door_while_the_board_stays_silent_is_refused(cabinet: SimulatedCabinet) -> None:
    assert cabinet.lockboard and cabinet.platform
    cabinet.lockboard.set_silent(True)
    wait_event(cabinet, "lock_fault")
    cid = cabinet.platform.send_command("open_door", {"door": 1, "session_id": str(uuid.uuid4()), "shopper": "s-2",
                                                      "auth": "face"})
    reply = cabinet.platform.wait_reply(cid, timeout=15)
    assert reply["ok"] is False and reply["error"] == "not_allowed: the lock board is not answering"


def test_a_scale_that_faults_during_the_session_is_an_item_for_review(cabinet: SimulatedCabinet) -> None:
    """Rule 9: the lane's transmitter stops answering while the door is open."""
    assert cabinet.lockboard and cabinet.scales
    sid = cabinet.authorize(1, "s-3")
    assert cabinet.lockboard.open_door(1)
    cabinet.wait_door_seen_open(1)
    cabinet.take("A2", 2)
    channel = cabinet.lane("A1").channel
    cabinet.scales.remove(channel)               # A1's transmitter is gone from the bus
    wait_event(cabinet, "scale_fault", channel=channel)
    cabinet.lockboard.close_door(1)
    end = cabinet.wait_session_end(sid, timeout=60)
    assert end["type"] == "sale"
    items = {i["lane"]: i for i in end["body"]["items"]}
    assert items["A1"]["qty"] == 0 and items["A1"]["weight_g"] is None and items["A1"]["flags"] == ["weight_mismatch"]
    assert items["A2"]["qty"] == 2
    assert "weight_mismatch" in end["body"]["flags"]
