"""What the cabinet is like right now: doors, lanes, faults, mode flags.

One object, written only on the core thread, read by the sessions, the status view and the
control handlers (through the core). It holds no I/O; what needs the ledger (the lanes'
tare and calibration) is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config import Config
from agent.protocol import Alarm
from agent.rules.doors import DoorMachine, Phase, Timing


@dataclass
class LaneView:
    """What the core knows about a lane right now."""

    name: str
    door: int
    channel: int
    gross_g: float | None = None
    stable: bool = False


class CabinetState:
    def __init__(self, cfg: Config, timing: Timing) -> None:
        self.timing = timing
        self.doors = {d.door: DoorMachine(d.door, timing) for d in cfg.doors}
        self.lock_of = {d.door: d.lock for d in cfg.doors}
        self.feedback: dict[int, bool | None] = {d.door: None for d in cfg.doors}
        self.lanes = {ln.lane: LaneView(ln.lane, ln.door, ln.channel) for ln in cfg.lanes}
        self.lane_of_channel = {ln.channel: ln.lane for ln in cfg.lanes}
        self.faults: set[str] = set()      # device alarms: lock_fault, scale_fault:N, camera_fault
        self.service_mode = False
        self.stopping = False              # SIGTERM: no new sessions
        self.ledger_corrupt = False

    def door_of_lock(self, lock: int) -> int | None:
        return next((d for d, lk in self.lock_of.items() if lk == lock), None)

    def lanes_of(self, door: int) -> list[LaneView]:
        return [v for v in self.lanes.values() if v.door == door]

    def door_lanes_stable(self, door: int) -> bool:
        return all(v.stable and v.gross_g is not None for v in self.lanes_of(door))

    def door_ready(self, door: int) -> bool:
        """A session can start: the door's state is known and its lanes have a stable baseline.
        (Right after a start neither is known yet; an open_door then waits a moment.)"""
        return self.feedback[door] is not None and self.door_lanes_stable(door)

    def faulted_lane(self, door: int) -> LaneView | None:
        return next((v for v in self.lanes_of(door) if Alarm.scale_fault(v.channel) in self.faults), None)

    @property
    def lock_faulted(self) -> bool:
        return Alarm.LOCK_FAULT in self.faults

    def busy_doors(self) -> list[int]:
        return [d for d, m in self.doors.items() if m.busy]

    def settling(self) -> bool:
        """A session is past its door and only waits for the scales."""
        return any(m.session is not None and m.session.phase in (Phase.SETTLING, Phase.TIMED_OUT)
                   for m in self.doors.values())

    def lane_weight(self, lane: str, rows: dict[str, dict[str, Any]]) -> float | None:
        """The lane's weight after the software tare and calibration factor (``rows``: the
        ledger's lane rows)."""
        view = self.lanes[lane]
        if view.gross_g is None:
            return None
        row = rows.get(lane, {})
        return round((view.gross_g - (row.get("tare_g") or 0.0)) * (row.get("factor") or 1.0), 3)
