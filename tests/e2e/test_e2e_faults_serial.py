"""Serial faults (issue 8): a USB-RS485 adapter unplugged and plugged back (the pty closes under the
agent, a new pty appears at the same path, as udev's stable name does), and garbage, truncated
and corrupted frames on both buses. The daemon never crashes, reports ``lock_fault`` /
``scale_fault`` then ``hardware_recovered``, refuses what it cannot do safely meanwhile, never
unlocks twice, and never settles a session from stale or bad readings.

The config names symlinks (``drivers.ptydevice.pty_symlink``) instead of the simulators' ptys;
unplugging stops a simulator (its pty is gone), replugging starts it again on a new pty and
points the symlink there. The simulators keep their state (doors, weights) across that.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.control import request
from agent.sim.cabinet import SimulatedCabinet, Timings
from drivers.lockboard.codec import AllReply, LockReply, UnlockRequest
from drivers.ptydevice import pty_symlink
from drivers.scales.codec import ExceptionReply, ReadHoldingReply, append_crc
from helpers import wait_until

pytestmark = pytest.mark.timeout(180)


BETWEEN_POLLS_S = 0.03   # the lock board is polled and the scales are read every 0.1 s, each in a few ms
TIMINGS = Timings(latch_release_s=0.15, settle_s=0.3, open_timeout_s=10.0, door_open_alarm_s=60.0,
                  ack_timeout_s=3.0)


class Shopper:
    def __init__(self) -> None:
        self.cab: SimulatedCabinet | None = None
        self.pull = True

    def __call__(self, lock: int) -> None:
        if self.pull and self.cab is not None and self.cab.lockboard is not None:
            self.cab.lockboard.open_door(lock)


class Adapters:
    """The two USB adapters of the cabinet, by their stable names."""

    def __init__(self, cab: SimulatedCabinet, where: Path) -> None:
        self.cab = cab
        self.paths = {"lockboard": where / "cabinet-lockboard", "scales": where / "cabinet-scales"}
        self._links = contextlib.ExitStack()

    def sim(self, which: str) -> Any:
        return getattr(self.cab, which)

    def link(self, which: str) -> None:
        self._links.enter_context(pty_symlink(self.sim(which).port, str(self.paths[which])))

    def unplug(self, which: str) -> None:
        """Pull the adapter between two polls, where each bus spends about 90 % of its time (an unplug in
        the middle of a transfer fails a read instead, which the link has always handled)."""
        sim = self.sim(which)
        seen = len(sim.received)
        if which == "lockboard":
            poll = sim.wait_for_frame(lambda f: f[0] == 0x80 and f[2] == 0x00, 5, since=seen)
            assert poll is not None, "no poll of the lock board"
        else:
            last = max(ln.channel for ln in self.cab.lane_specs)   # the last read of a scale cycle
            wait_until(lambda: any(r.slave == last and r.frame[2:4] == b"\x00\x50" for r in sim.received[seen:]),
                       5, "the end of a scale cycle")
        time.sleep(BETWEEN_POLLS_S)   # into the quiet gap after that poll (where on the line, not a wait)
        sim.stop()   # the pty closes under the agent; the name now points nowhere

    def replug(self, which: str) -> None:
        self.sim(which).start()  # a new pty, then the stable name points at it again
        self.link(which)

    def close(self) -> None:
        self._links.close()


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SimulatedCabinet, Adapters, Shopper]]:
    holder: dict[str, Adapters] = {}
    real_config: Callable[[SimulatedCabinet], dict[str, Any]] = SimulatedCabinet.config

    def config_with_stable_names(self: SimulatedCabinet) -> dict[str, Any]:
        cfg = real_config(self)
        if "adapters" not in holder:
            adapters = holder["adapters"] = Adapters(self, tmp_path / "dev")
            adapters.link("lockboard")
            adapters.link("scales")
        cfg["lockboard"]["port"] = str(holder["adapters"].paths["lockboard"])
        cfg["scale"]["port"] = str(holder["adapters"].paths["scales"])
        return cfg

    monkeypatch.setattr(SimulatedCabinet, "config", config_with_stable_names)
    shopper = Shopper()
    cab = SimulatedCabinet(tmp_path / "cab", cabinet_id="CAB-SER", timings=TIMINGS, on_unlock=shopper)
    shopper.cab = cab
    try:
        cab.start()
        yield cab, holder["adapters"], shopper
    finally:
        cab.stop()
        if "adapters" in holder:
            holder["adapters"].close()


# -- helpers ----------------------------------------------------------------------------------------------


def status(cab: SimulatedCabinet) -> dict[str, Any]:
    answer = request(str(cab.workdir / "control.sock"), "status", timeout_s=10)
    assert answer.get("ok"), answer
    return answer["result"]


def events(cab: SimulatedCabinet, kind: str) -> list[dict[str, Any]]:
    assert cab.platform is not None
    return cab.platform.events(kind)


def wait_event(cab: SimulatedCabinet, kind: str, count: int, timeout: float = 10.0,
               where: Callable[[dict[str, Any]], bool] = lambda _e: True) -> list[dict[str, Any]]:
    assert cab.platform is not None
    cab.platform.wait_for(lambda: len([e for e in events(cab, kind) if where(e)]) >= count, timeout,
                          f"{count} {kind} event(s)")
    return [e for e in events(cab, kind) if where(e)]


def unlock_frames(cab: SimulatedCabinet, lock: int) -> int:
    assert cab.lockboard is not None
    frame = UnlockRequest(1, lock).to_bytes()
    return sum(1 for _t, f in list(cab.lockboard.received) if f == frame)


def refused(cab: SimulatedCabinet, door: int) -> str:
    """open_door is refused (reply and command_rejected record); returns the error text."""
    assert cab.platform is not None
    command_id = cab.platform.send_command("open_door", {"door": door, "session_id": str(uuid.uuid4()),
                                                         "shopper": "refused", "auth": "face"})
    reply = cab.platform.wait_reply(command_id, 15)
    assert reply["ok"] is False, reply
    cab.platform.wait_for(lambda: any(e.get("command_id") == command_id for e in events(cab, "command_rejected")),
                          15, "its command_rejected record")
    return str(reply["error"])


def sold(rec: dict[str, Any]) -> list[tuple[str, int]]:
    assert rec["type"] == "sale", rec
    return [(i["lane"], i["qty"]) for i in rec["body"]["items"]]


def alive(cab: SimulatedCabinet) -> None:
    assert cab.agent is not None and cab.agent.poll() is None, "the daemon exited"


def chain_ok(cab: SimulatedCabinet) -> None:
    assert cab.platform is not None
    last = status(cab)["last_seq"]
    cab.platform.wait_contiguous(last, 30)
    assert cab.platform.chain_errors == [] and cab.platform.errors == 0


# -- the lock board's adapter ---------------------------------------------------------------------------------


def test_lock_board_adapter_unplugged_and_replugged(rig: tuple[SimulatedCabinet, Adapters, Shopper]) -> None:
    cab, adapters, _shopper = rig
    assert cab.platform is not None
    sid = cab.shop(1, {"A1": 1})
    assert sold(cab.wait_session_end(sid)) == [("A1", 1)]

    adapters.unplug("lockboard")
    (fault,) = wait_event(cab, "lock_fault", 1)
    assert fault.get("board") == 1
    wait_until(lambda: "lock_fault" in status(cab)["alarms"], 10, "the lock_fault alarm")
    assert all(d["open"] is None and d["locked"] is None for d in status(cab)["doors"])   # unknown, not shut
    assert "lock" in refused(cab, 1)      # no shopper is let in on a board that does not answer
    alive(cab)

    adapters.replug("lockboard")
    wait_event(cab, "hardware_recovered", 1, where=lambda e: e.get("device") == "lockboard")
    wait_until(lambda: "lock_fault" not in status(cab)["alarms"], 10, "the lock_fault alarm cleared")
    wait_until(lambda: all(d["open"] is False and d["locked"] is True for d in status(cab)["doors"]), 10,
               "the doors known again")
    unlocks = unlock_frames(cab, 2)
    sid = cab.shop(2, {"B2": 1})
    assert sold(cab.wait_session_end(sid)) == [("B2", 1)]
    assert unlock_frames(cab, 2) == unlocks + 1
    assert len(events(cab, "lock_fault")) == 1           # one episode, one fault, one recovery
    assert len([e for e in events(cab, "hardware_recovered") if e.get("device") == "lockboard"]) == 1
    alive(cab)
    chain_ok(cab)


def test_lock_board_adapter_lost_while_the_door_is_open(rig: tuple[SimulatedCabinet, Adapters, Shopper]) -> None:
    """The shopper has the door open when the adapter goes; takes and shuts while the board is unreachable:
    the session waits, then settles once the board reads the door shut again. One unlock, one sale."""
    cab, adapters, _shopper = rig
    assert cab.lockboard is not None
    unlocks = unlock_frames(cab, 1)
    sid = cab.authorize(1, "in-the-dark")
    cab.wait_door_seen_open(1)
    adapters.unplug("lockboard")
    wait_event(cab, "lock_fault", 1)
    cab.take("A2", 1)
    cab.take("A1", 3)
    cab.lockboard.close_door(1)
    with pytest.raises(TimeoutError):      # no reading of the door: the session must not end yet
        cab.wait_session_end(sid, timeout=1.5)
    adapters.replug("lockboard")
    wait_event(cab, "hardware_recovered", 1, where=lambda e: e.get("device") == "lockboard")
    assert sold(cab.wait_session_end(sid)) == [("A1", 3), ("A2", 1)]
    assert unlock_frames(cab, 1) == unlocks + 1
    alive(cab)
    chain_ok(cab)


# -- the scales' adapter -----------------------------------------------------------------------------------------


def test_scale_adapter_unplugged_and_replugged(rig: tuple[SimulatedCabinet, Adapters, Shopper]) -> None:
    cab, adapters, _shopper = rig
    channels = sorted(ln.channel for ln in cab.lane_specs)
    adapters.unplug("scales")
    faults = wait_event(cab, "scale_fault", len(channels))
    assert sorted(e["channel"] for e in faults) == channels
    wait_until(lambda: {f"scale_fault:{ch}" for ch in channels} <= set(status(cab)["alarms"]), 10,
               "a scale_fault alarm per channel")
    assert "scale" in refused(cab, 2)     # no baseline can be taken: no session
    alive(cab)

    adapters.replug("scales")
    rec = wait_event(cab, "hardware_recovered", len(channels), where=lambda e: e.get("device") == "scale")
    assert sorted(e["channel"] for e in rec) == channels
    wait_until(lambda: not any(a.startswith("scale_fault") for a in status(cab)["alarms"]), 10,
               "the scale alarms cleared")
    sid = cab.shop(2, {"B1": 2})
    assert sold(cab.wait_session_end(sid)) == [("B1", 2)]
    assert len(events(cab, "scale_fault")) == len(channels)
    alive(cab)
    chain_ok(cab)


def test_items_taken_while_the_scales_are_unplugged_are_weighed_after_they_return(
        rig: tuple[SimulatedCabinet, Adapters, Shopper]) -> None:
    """The last readings before the loss are stale (they predate the take): settling from them would make
    this an empty session. The session must wait for fresh, stable readings (sessions rule 9)."""
    cab, adapters, _shopper = rig
    assert cab.lockboard is not None
    sid = cab.authorize(1, "stale")
    cab.wait_door_seen_open(1)
    adapters.unplug("scales")
    wait_event(cab, "scale_fault", len(cab.lane_specs))
    cab.take("A1", 2)
    cab.lockboard.close_door(1)
    with pytest.raises(TimeoutError):      # nothing to weigh with: the session must not end yet
        cab.wait_session_end(sid, timeout=2.0)
    adapters.replug("scales")
    assert sold(cab.wait_session_end(sid, timeout=30)) == [("A1", 2)]
    alive(cab)
    chain_ok(cab)


# -- garbage on the lines ------------------------------------------------------------------------------------------


def lock_board_noise(rng: random.Random) -> bytes:
    """What a noisy RS-485 line or a neighbour puts before the board's reply."""
    all_shut = AllReply(1, 0, 0, 0).to_bytes()
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 12))
    if kind == 1:                                   # a reply cut short
        return all_shut[:rng.randint(1, len(all_shut) - 1)]
    if kind == 2:                                   # a reply with a broken BCC
        frame = bytearray(AllReply(1, rng.randrange(256), rng.randrange(256), rng.randrange(256)).to_bytes())
        frame[-1] ^= 1 + rng.randrange(255)
        return bytes(frame)
    if kind == 3:                                   # another board's reply
        return AllReply(2 + rng.randrange(200), 0xFF, 0xFF, 0xFF).to_bytes()
    if kind == 4:                                   # a single-lock reply where a query-all reply is due
        return LockReply(0x80, 1, 1 + rng.randrange(24), 0x11).to_bytes()
    return bytes([0x80, 0x01]) + rng.randbytes(rng.randint(0, 3))   # a false start


def scale_noise(rng: random.Random, slaves: list[int]) -> bytes:
    other = 200 + rng.randrange(40)
    reply = ReadHoldingReply(rng.choice(slaves), (0, 1234)).to_bytes()
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 12))
    if kind == 1:                                   # a reply cut short
        return reply[:rng.randint(1, len(reply) - 1)]
    if kind == 2:                                   # a reply with a broken CRC (a huge weight in it)
        frame = bytearray(ReadHoldingReply(rng.choice(slaves), (0x7FFF, 0xFFFF)).to_bytes())
        frame[-1] ^= 1 + rng.randrange(255)
        return bytes(frame)
    if kind == 3:                                   # another transmitter's reply
        return ReadHoldingReply(other, (0x7FFF, 0xFFFF)).to_bytes()
    if kind == 4:                                   # an exception of another transmitter
        return ExceptionReply(other, 0x83, 0x02).to_bytes()
    return append_crc(bytes([other]) + rng.randbytes(rng.randint(1, 6)))


class Noise(threading.Thread):
    """Keeps garbage queued on both lines (each simulator writes it just before its next reply)."""

    def __init__(self, cab: SimulatedCabinet, seed: int) -> None:
        super().__init__(name="noise", daemon=True)
        self.cab = cab
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.injected = 0

    def run(self) -> None:
        assert self.cab.lockboard is not None and self.cab.scales is not None
        slaves = [ln.channel for ln in self.cab.lane_specs]
        while not self.stop_event.wait(0.02):
            self.cab.lockboard.inject_garbage(lock_board_noise(self.rng))
            self.cab.scales.inject_garbage(scale_noise(self.rng, slaves))
            self.injected += 2


def test_garbage_truncated_and_corrupted_frames_never_make_a_wrong_sale(
        rig: tuple[SimulatedCabinet, Adapters, Shopper]) -> None:
    cab, _adapters, _shopper = rig
    assert cab.platform is not None
    noise = Noise(cab, seed=8)
    plan = [(1, {"A1": 2}), (2, {"B1": 1, "B2": 1}), (1, {}), (2, {"B2": 3}), (1, {"A1": 1, "A2": 1}),
            (2, {"B1": 2})]
    noise.start()
    try:
        for door, takes in plan:
            unlocks = unlock_frames(cab, door)
            sid = cab.shop(door, takes, wait_sale=False)
            rec = cab.wait_session_end(sid, timeout=30)
            if takes:
                assert sold(rec) == [(ln.lane, takes[ln.lane]) for ln in cab.lane_specs if ln.lane in takes]
                assert rec["body"]["flags"] == [] and all(i["flags"] == [] for i in rec["body"]["items"])
            else:
                assert rec["body"]["kind"] == "session_empty", rec
            assert unlock_frames(cab, door) == unlocks + 1
    finally:
        noise.stop_event.set()
        noise.join(5)
    assert noise.injected > 100
    # the resync found every real reply behind the garbage: not one missed poll turned into a fault
    assert events(cab, "lock_fault") == [] and events(cab, "scale_fault") == []
    assert events(cab, "door_forced") == []
    alive(cab)
    chain_ok(cab)


def test_lost_unlock_reply_is_followed_by_a_query_not_a_second_pulse(
        rig: tuple[SimulatedCabinet, Adapters, Shopper]) -> None:
    """The board carries the unlock out but its reply is lost on the line: the agent asks the lock before
    anything else (serial.md: never re-sent blindly), finds it open, and the session goes on."""
    cab, _adapters, _shopper = rig
    assert cab.lockboard is not None
    unlocks = unlock_frames(cab, 2)
    cab.lockboard.fail_next(1, header=0x8A, execute=True)
    sid = cab.shop(2, {"B1": 1}, wait_sale=False)
    assert sold(cab.wait_session_end(sid)) == [("B1", 1)]
    assert unlock_frames(cab, 2) == unlocks + 1
    alive(cab)
