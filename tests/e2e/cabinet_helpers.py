"""Reads and waits the end-to-end modules share, against a started SimulatedCabinet.

Every wait is a notifying one (the reference platform's ``wait_for``) or a bounded poll
(``helpers.wait_until``) of something nobody notifies about; none sleeps a guessed time.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable
from typing import Any

from agent.sim.cabinet import SimulatedCabinet
from drivers.lockboard.codec import UnlockRequest
from helpers import wait_until

CabinetFactory = Callable[..., SimulatedCabinet]
"""The ``make_cabinet`` fixture's type (tests/e2e/conftest.py)."""

OPERATOR = pwd.getpwuid(os.getuid()).pw_name
"""Who the daemon records as the operator of a cabinetctl command run by these tests."""


def ctl_json(cab: SimulatedCabinet, *args: str) -> Any:
    """``cabinetctl ARGS --json``, which must succeed, parsed."""
    out = cab.ctl(*args, "--json")
    assert out.returncode == 0, (args, out.returncode, out.stdout, out.stderr)
    return json.loads(out.stdout)


def cabinetctl_status(cab: SimulatedCabinet) -> dict[str, Any]:
    """``cabinetctl status --json``, the operator's real tool (a subprocess)."""
    status: dict[str, Any] = ctl_json(cab, "status")
    return status


def unlock_frames(cab: SimulatedCabinet, lock: int) -> int:
    """How many unlock requests for ``lock`` the lock board has received so far."""
    assert cab.lockboard
    frame = UnlockRequest(1, lock).to_bytes()
    return sum(1 for _t, f in list(cab.lockboard.received) if f == frame)


def wait_event(cab: SimulatedCabinet, kind: str, pred: Callable[[dict[str, Any]], bool] | None = None, *,
               timeout: float = 15.0, after: int = 0, **match: Any) -> dict[str, Any]:
    """The first event record (lowest seq above ``after``) of ``kind`` whose body has the
    ``match`` fields and satisfies ``pred``, as the platform received it."""
    assert cab.platform
    platform = cab.platform
    found: list[dict[str, Any]] = []

    def seen() -> bool:  # evaluated under the platform's lock
        records = platform.records
        for seq in sorted(records):
            rec = records[seq]
            body = rec["body"]
            if (seq > after and rec["type"] == "event" and body.get("kind") == kind
                    and all(body.get(k) == v for k, v in match.items()) and (pred is None or pred(body))):
                found.append({**rec, "body": dict(body)})
                return True
        return False

    platform.wait_for(seen, timeout, f"event {kind} {match} after seq {after}")
    return found[0]


def lane_weight(cab: SimulatedCabinet, lane: str) -> float | None:
    """A lane's weight as ``cabinetctl status --json`` reports it."""
    return next(ln["weight_g"] for ln in cabinetctl_status(cab)["lanes"] if ln["lane"] == lane)


def wait_lane_weight(cab: SimulatedCabinet, lane: str, grams: float, tol: float = 0.5) -> None:
    def close() -> bool:
        w = lane_weight(cab, lane)
        return w is not None and abs(w - grams) <= tol

    wait_until(close, 10, f"lane {lane} reading {grams} g")
