"""Shopping sessions (operations.md rules 1-7) on the core thread: starting one from an
``open_door``, the unlock, what the door machines decide, and settling into a sale.

Part of the core: it runs only on the core thread and writes the ledger through it; the
decisions themselves are agent.rules.doors (state machine) and agent.rules.reconcile (weights -> items).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.rules.commands import Command, Rejected
from agent.rules.doors import (ActiveSession, Closed, DoorForced, DoorMachine, LeftOpen, LeftOpenCleared, Opened,
                         Reopened, Settle)
from agent.events import UnlockDone
from agent.rules.reconcile import LaneChange, reconcile

if TYPE_CHECKING:
    from agent.core import Core


def product_dict(product: Any) -> dict[str, Any]:
    """What a sale item (and a lane's snapshot) needs of a catalog product."""
    return {
        "gtin": product.gtin, "name": product.name, "cert_id": product.cert_id,
        "unit_weight_g": product.unit_weight_g, "weight_tolerance_g": product.weight_tolerance_g,
    }


log = logging.getLogger(__name__)

BASELINE_WAIT_S = 3.0   # an open_door may wait this long (at least 2 x settle_s) for a known door and stable lanes


@dataclass
class PendingOpen:
    command: Command
    deadline: float


class SessionRunner:
    def __init__(self, core: "Core") -> None:
        self.core = core
        self.pending_open: dict[int, PendingOpen] = {}
        self.pending_reply: dict[str, str] = {}   # session_id -> command id awaiting the unlock result

    def open_door(self, cmd: Command) -> None:
        door = cmd.args["door"]
        self._check_can_open(cmd, door)
        if door in self.pending_open:
            raise Rejected(f"not_allowed: door {door} is busy with another session", cmd.id, cmd.type)
        if not self.core.door_ready(door):
            if not self.core.remember(cmd):
                return
            wait_s = max(BASELINE_WAIT_S, 2 * self.core.cfg.scale.settle_s)
            self.pending_open[door] = PendingOpen(cmd, self.core.clock() + wait_s)
            log.info("open_door %s waits for stable lanes behind door %d", cmd.id, door)
            return
        self._start_session(cmd)

    def _check_can_open(self, cmd: Command, door: int) -> None:
        if self.core.stopping:
            raise Rejected("not_allowed: the agent is shutting down", cmd.id, cmd.type)
        if self.core.service_mode:
            raise Rejected("not_allowed: the cabinet is in service mode", cmd.id, cmd.type)
        if self.core.doors[door].busy:
            raise Rejected(f"not_allowed: door {door} is busy with another session", cmd.id, cmd.type)
        if not self.core.ledger_ok:
            raise Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type)
        if "lock_fault" in self.core.faults:
            raise Rejected("not_allowed: the lock board is not answering", cmd.id, cmd.type)
        for view in self.core.lanes.values():
            if view.door == door and f"scale_fault:{view.channel}" in self.core.faults:
                raise Rejected(f"not_allowed: the scale of lane {view.name} is not answering", cmd.id, cmd.type)

    def retry_pending(self, now: float) -> None:
        for door, pending in list(self.pending_open.items()):
            if self.core.door_ready(door):
                del self.pending_open[door]
                try:
                    self._check_can_open(pending.command, door)
                    self._start_session(pending.command)
                except Rejected as rej:
                    self.core.reject(rej)
            elif now > pending.deadline:
                del self.pending_open[door]
                why = ("the lock board has not answered yet" if self.core.feedback[door] is None
                       else "the scales are not stable")
                self.core.reject(Rejected(f"not_allowed: {why}", pending.command.id, "open_door"))

    def _start_session(self, cmd: Command) -> None:
        door = cmd.args["door"]
        rows = self.core.ledger.lane_rows()
        baseline = {v.name: self.core.lane_weight(v.name, rows) for v in self.core.lanes.values() if v.door == door}
        now, wall = self.core.clock(), self.core.wall()
        try:
            with self.core.ledger.transaction() as tx:
                tx.remember_command(cmd.id, self.core.seen_until(cmd))
                tx.open_session(session_id=cmd.args["session_id"], command_id=cmd.id, door=door,
                                shopper=cmd.args["shopper"], auth=cmd.args["auth"],
                                baseline=baseline, unlock_at=wall)
        except Exception as exc:  # noqa: BLE001 - e.g. a session id used before
            if "UNIQUE" in str(exc):
                raise Rejected("invalid_args: session_id was used before", cmd.id, cmd.type) from None
            self.core.ledger_failed(exc)
            raise Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type) from None
        session = ActiveSession(session_id=cmd.args["session_id"], door=door, shopper=cmd.args["shopper"],
                                unlock_at=now)
        self.core.doors[door].begin(session)
        self.pending_reply[session.session_id] = cmd.id
        # Rule 1: the baseline is journaled (committed above) before the unlock frame is sent.
        if self.core.lockboard is not None:
            self.core.lockboard.unlock(self.core.lock_of[door], session.session_id)
        log.info("session %s: door %d unlocking for %s (baseline %s)", session.session_id, door,
                 session.shopper, baseline)
        self.core.publish_status()

    def on_unlock_done(self, done: UnlockDone) -> None:
        waiter = self.core.unlock_waiters.pop(done.token, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(done)   # a service unlock's cabinetctl is waiting for it
        door = next((d for d, lock in self.core.lock_of.items() if lock == done.lock), None)
        if door is None:
            return
        machine = self.core.doors[door]
        machine.last_pulse_at = done.at
        if machine.session is not None and machine.session.session_id == done.token:
            machine.session.unlock_at = done.at
        command_id = self.pending_reply.pop(done.token, None)
        if command_id is not None:
            if done.ok:
                self.core.reply(command_id, True, result={"session_id": done.token, "door": door, "unlocked": True})
            else:
                self.core.reply(command_id, False, error=f"lock_fault: unlock not confirmed ({done.detail})",
                           result={"session_id": done.token, "door": door, "unlocked": False})

    def apply(self, machine: DoorMachine, action: Any) -> None:
        s = machine.session
        if isinstance(action, Opened):
            self.core.journal(action.session_id, opened_at=action.at, state="open")
            log.info("session %s: door %d opened", action.session_id, machine.door)
        elif isinstance(action, Closed):
            self.core.journal(action.session_id, closed_at=action.at, state="settling")
            log.info("session %s: door %d shut, settling", action.session_id, machine.door)
        elif isinstance(action, Reopened):
            self.core.journal(action.session_id, closed_at=None, state="open")
        elif isinstance(action, Settle) and s is not None:
            self._settle(machine, s, action.timed_out, action.weigh)
        elif isinstance(action, DoorForced):
            self.core.record_event("door_forced", door=action.door)
        elif isinstance(action, LeftOpen):
            self.core.record_event("door_left_open", door=action.door, session_id=action.session_id, open_s=action.open_s)
        elif isinstance(action, LeftOpenCleared):
            log.info("door %d shut again after the left-open alarm", action.door)
        self.core.publish_status()

    def _settle(self, machine: DoorMachine, s: ActiveSession, timed_out: bool, weigh: bool = True) -> None:
        journal = next((r for r in self.core.ledger.active_sessions() if r["session_id"] == s.session_id), None)
        baseline: dict[str, float | None] = journal["baseline"] if journal else {}
        rows = self.core.ledger.lane_rows()
        at = self.core.now_dt()
        changes = []
        for view in self.core.lanes.values():
            if view.door != machine.door or not weigh:
                continue
            base = baseline.get(view.name)
            current = self.core.lane_weight(view.name, rows)
            if base is None or current is None:
                continue
            changes.append(self._lane_change(view.name, rows.get(view.name, {}), base, current, at))
        result = reconcile(changes, s.scans)
        wall = self.core.wall()
        try:
            with self.core.ledger.transaction() as tx:
                if not result.empty:
                    body = {
                        "sale_id": str(uuid.uuid4()), "session_id": s.session_id, "door": s.door, "shopper": s.shopper,
                        "opened_at": self.core.ts(s.opened_at), "closed_at": self.core.ts(s.closed_at or wall),
                        "items": result.items, "total_cents": result.total_cents, "flags": result.flags,
                    }
                    tx.append("sale", body, self.core.now_ts())
                elif timed_out:
                    tx.append("event", {"kind": "session_timeout", "session_id": s.session_id,
                                        "shopper": s.shopper, "door": s.door}, self.core.now_ts())
                else:
                    tx.append("event", {"kind": "session_empty", "session_id": s.session_id, "shopper": s.shopper,
                                        "door": s.door, "opened_at": self.core.ts(s.opened_at),
                                        "closed_at": self.core.ts(s.closed_at)}, self.core.now_ts())
                tx.update_session(s.session_id, state="ended", ended_at=wall)
        except Exception as exc:  # noqa: BLE001
            self.core.ledger_failed(exc)
            return
        machine.end_session()
        outcome = "sale" if not result.empty else ("session_timeout" if timed_out else "session_empty")
        log.info("session %s ended: %s %s", s.session_id, outcome,
                 f"total {result.total_cents} cents" if not result.empty else "")

    def _lane_change(self, lane: str, row: dict[str, Any], base: float, current: float,
                     at: dt.datetime) -> LaneChange:
        gtin = row.get("gtin")
        product = self.core.catalog.product(gtin) if gtin else None
        info = product_dict(product) if product else (row.get("product") or {})
        certified = bool(gtin) and self.core.catalog.lookup(gtin, at).certified
        return LaneChange(
            lane=lane, baseline_g=base, current_g=current, gtin=gtin, name=info.get("name"),
            cert_id=info.get("cert_id"), unit_weight_g=info.get("unit_weight_g"),
            tolerance_g=info.get("weight_tolerance_g"), unit_price_cents=row.get("price_cents") or 0,
            certified=certified,
        )

