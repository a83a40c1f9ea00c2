"""Shopping sessions (operations.md rules 1-7) on the core thread: starting one from an
``open_door``, the unlock, what the door machines decide, and settling into a sale.

It gets the small things it needs (cabinet state, recorder, catalog, clock, config and an
outbox for replies and unlocks) and never sees the core; the decisions themselves are
agent.rules.doors (state machine) and agent.rules.reconcile (weights -> items).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.clock import Clock
from agent.config import Config
from agent.events import UnlockDone
from agent.ports import Outbox
from agent.protocol import Alarm, EventKind, RecordType
from agent.recorder import RecordConflict, Recorder, RecordFailed
from agent.rules.commands import Command, Rejected
from agent.rules.doors import (
    Action,
    ActiveSession,
    Closed,
    DoorForced,
    DoorMachine,
    LeftOpen,
    LeftOpenCleared,
    Opened,
    Reopened,
    Settle,
)
from agent.rules.reconcile import LaneChange, reconcile
from agent.state import CabinetState
from agent.store.catalog import CatalogStore

log = logging.getLogger(__name__)

BASELINE_WAIT_S = 3.0   # an open_door may wait this long (at least 2 x settle_s) for a known door and stable lanes


PROBE_WAIT_S = 2.0      # rule 8: how long an open_door waits for the extra query of a faulted lock board


@dataclass
class PendingOpen:
    """An ``open_door`` that waits (for stable lanes, or for the lock board's answer). Nothing of
    it is committed yet, so its PUBLISH stays unacknowledged: after a crash the broker delivers
    it again. ``done`` are called once its outcome is committed (mqtt.md v1.1)."""

    command: Command
    deadline: float
    probing: bool = False   # waits for the answer to a query of the faulted lock board (rule 8)
    done: list[Callable[[], None]] = field(default_factory=list)


class SessionRunner:
    def __init__(self, state: CabinetState, recorder: Recorder, catalog: CatalogStore, clock: Clock, cfg: Config,
                 outbox: Outbox, storage_low: Callable[[], bool] = lambda: False) -> None:
        self.state = state
        self.recorder = recorder
        self.catalog = catalog
        self.clock = clock
        self.cfg = cfg
        self.outbox = outbox
        self.storage_low = storage_low
        self.pending_open: dict[int, PendingOpen] = {}
        self.pending_reply: dict[str, str] = {}   # session_id -> command id awaiting the unlock result

    def seen_until(self, cmd: Command) -> float:
        """How long a command id counts as seen (replay protection)."""
        return cmd.expires_at + self.cfg.platform.clock_skew_s

    # -- starting ---------------------------------------------------------------------------------
    def open_door(self, cmd: Command, done: Callable[[], None] = lambda: None) -> None:
        """Start a session, or wait briefly for a known door and stable lanes; Rejected if not
        allowed. ``done`` is called once the outcome is committed (now, or when it waited)."""
        door = cmd.args["door"]
        waiting = self.pending_open.get(door)
        if waiting is not None and waiting.command.id == cmd.id:
            if waiting.command != cmd:   # another command under the id of the one that waits
                raise Rejected("replay: command id seen before", cmd.id, cmd.type)
            waiting.done.append(done)   # delivered again while it waits: one outcome for both
            return
        self._check_can_open(cmd, door, probe_ok=True)
        if waiting is not None:
            raise Rejected(f"not_allowed: door {door} is busy with another session", cmd.id, cmd.type)
        probing = self.state.lock_faulted
        if probing or not self.state.door_ready(door):
            if probing:
                # Rule 8: a fault that is already over must not turn the shopper away: ask the board.
                wait_s = PROBE_WAIT_S
                self.outbox.probe_lockboard()
                log.info("open_door %s: the lock board is marked faulty, asking it once more", cmd.id)
            else:
                wait_s = max(BASELINE_WAIT_S, 2 * self.cfg.scale.settle_s)
                log.info("open_door %s waits for stable lanes behind door %d", cmd.id, door)
            self.pending_open[door] = PendingOpen(cmd, self.clock.monotonic() + wait_s, probing, [done])
            return
        self._start_session(cmd)
        done()

    def _check_can_open(self, cmd: Command, door: int, probe_ok: bool = False) -> None:
        """Rejected unless a session may start now (``probe_ok``: a lock fault is checked by a probe)."""
        st = self.state
        if st.stopping:
            raise Rejected("not_allowed: the agent is shutting down", cmd.id, cmd.type)
        if st.service_mode:
            raise Rejected("not_allowed: the cabinet is in service mode", cmd.id, cmd.type)
        if st.doors[door].busy:
            raise Rejected(f"not_allowed: door {door} is busy with another session", cmd.id, cmd.type)
        if not self.recorder.writable:
            self.recorder.recheck()   # a transient error must not refuse sessions until housekeeping
        if not self.recorder.writable:
            raise Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type)
        if self.storage_low():
            # refused before the ledger can fail: a session must be able to record its sale
            raise Rejected("not_allowed: storage is low (storage_low)", cmd.id, cmd.type)
        if st.lock_faulted and not probe_ok:
            raise Rejected("not_allowed: the lock board is not answering", cmd.id, cmd.type)
        lane = st.faulted_lane(door)
        if lane is not None:
            raise Rejected(f"not_allowed: the scale of lane {lane.name} is not answering", cmd.id, cmd.type)

    def retry_pending(self, now: float) -> None:
        """Start the sessions that waited for their door, or refuse them past their deadline."""
        for door, pending in list(self.pending_open.items()):
            if pending.probing and self.state.lock_faulted:
                if now > pending.deadline:
                    del self.pending_open[door]
                    self._refuse(pending, Rejected("not_allowed: the lock board is not answering",
                                                   pending.command.id, "open_door"))
                continue
            if pending.probing:
                # the board answered: from here on it waits for the door's state and stable lanes
                pending.probing = False
                pending.deadline = now + max(BASELINE_WAIT_S, 2 * self.cfg.scale.settle_s)
            if self.state.door_ready(door):
                del self.pending_open[door]
                try:
                    self._check_can_open(pending.command, door)
                    self._start_session(pending.command)
                except Rejected as rej:
                    self._refuse(pending, rej)
                    continue
                for done in pending.done:
                    done()
            elif now > pending.deadline:
                del self.pending_open[door]
                why = ("the lock board has not answered yet" if self.state.feedback[door] is None
                       else "the scales are not stable")
                self._refuse(pending, Rejected(f"not_allowed: {why}", pending.command.id, "open_door"))

    def _refuse(self, pending: PendingOpen, rej: Rejected) -> None:
        """A waiting open_door is refused: its id is seen from now on, the refusal recorded."""
        self.recorder.remember_command(pending.command.id, self.seen_until(pending.command))
        self.outbox.reject(rej)
        for done in pending.done:
            done()

    def _start_session(self, cmd: Command) -> None:
        door = cmd.args["door"]
        rows = self.recorder.lane_rows()
        baseline = {v.name: self.state.lane_weight(v.name, rows) for v in self.state.lanes_of(door)}
        now, wall = self.clock.monotonic(), self.clock.wall()
        try:
            with self.recorder.transaction() as tx:
                tx.remember_command(cmd.id, self.seen_until(cmd))
                tx.open_session(session_id=cmd.args["session_id"], command_id=cmd.id, door=door,
                                shopper=cmd.args["shopper"], auth=cmd.args["auth"],
                                baseline=baseline, unlock_at=wall)
        except RecordConflict:
            raise Rejected("invalid_args: session_id was used before", cmd.id, cmd.type) from None
        except RecordFailed:
            raise Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type) from None
        session = ActiveSession(session_id=cmd.args["session_id"], door=door, shopper=cmd.args["shopper"],
                                unlock_at=now)
        self.state.doors[door].begin(session)
        self.pending_reply[session.session_id] = cmd.id
        # Rule 1: the baseline is journaled (committed above) before the unlock frame is sent.
        self.outbox.unlock(door, session.session_id)
        log.info("session %s: door %d unlocking (baseline %s)", session.session_id, door, baseline)
        log.debug("session %s: shopper %s", session.session_id, session.shopper)
        self.outbox.status_changed()

    def on_lock_probed(self, ok: bool) -> None:
        """The faulted lock board was asked once more (rule 8): refuse who waited for it if silent."""
        if ok:
            return
        for door, pending in list(self.pending_open.items()):
            if pending.probing:
                del self.pending_open[door]
                self._refuse(pending, Rejected("not_allowed: the lock board is not answering",
                                               pending.command.id, "open_door"))

    # -- the unlock's outcome -----------------------------------------------------------------------
    def on_unlock_done(self, done: UnlockDone) -> None:
        door = self.state.door_of_lock(done.lock)
        if door is None:
            return
        machine = self.state.doors[door]
        machine.last_pulse_at = done.at
        if machine.session is not None and machine.session.session_id == done.token:
            machine.session.unlock_at = done.at
        command_id = self.pending_reply.pop(done.token, None)
        if command_id is not None:
            if done.ok:
                self.outbox.reply(command_id, True, result={"session_id": done.token, "door": door, "unlocked": True})
            else:
                self.outbox.reply(command_id, False, error=f"lock_fault: unlock not confirmed ({done.detail})",
                                  result={"session_id": done.token, "door": door, "unlocked": False})

    # -- what the door machines decide ------------------------------------------------------------------
    def apply(self, machine: DoorMachine, action: Action) -> None:
        s = machine.session
        if isinstance(action, Opened):
            self.recorder.journal(action.session_id, opened_at=action.at, state="open")
            log.info("session %s: door %d opened", action.session_id, machine.door)
        elif isinstance(action, Closed):
            self.recorder.journal(action.session_id, closed_at=action.at, state="settling")
            log.info("session %s: door %d shut, settling", action.session_id, machine.door)
        elif isinstance(action, Reopened):
            self.recorder.journal(action.session_id, closed_at=None, state="open")
        elif isinstance(action, Settle) and s is not None:
            self._settle(machine, s, action.timed_out, action.weigh)
        elif isinstance(action, DoorForced):
            self.recorder.event(EventKind.DOOR_FORCED, door=action.door)
        elif isinstance(action, LeftOpen):
            self.recorder.event(EventKind.DOOR_LEFT_OPEN, door=action.door, session_id=action.session_id,
                                open_s=action.open_s)
        elif isinstance(action, LeftOpenCleared):
            log.info("door %d shut again after the left-open alarm", action.door)
        self.outbox.status_changed()

    def _settle(self, machine: DoorMachine, s: ActiveSession, timed_out: bool, weigh: bool = True) -> None:
        journal = self.recorder.journaled(s.session_id)
        baseline: dict[str, float | None] = journal["baseline"] if journal else {}
        rows = self.recorder.lane_rows()
        at = self.clock.now_dt()
        changes = []
        for view in self.state.lanes_of(machine.door) if weigh else []:
            base = baseline.get(view.name)
            current = self.state.lane_weight(view.name, rows)
            if Alarm.scale_fault(view.channel) in self.state.faults:
                current = None   # rule 9: never weighed from stale or bad readings
            if base is None or current is None:
                if timed_out:
                    continue     # the door was never opened: nothing to review
                log.warning("session %s: lane %s could not be weighed; recorded for review", s.session_id,
                            view.name)
            changes.append(self._lane_change(view.name, rows.get(view.name, {}), base, current, at))
        result = reconcile(changes, s.scans)
        wall = self.clock.wall()
        ts, now_ts = self.clock.ts, self.clock.now_ts()
        try:
            with self.recorder.transaction() as tx:
                if not result.empty:
                    body = {
                        "sale_id": str(uuid.uuid4()), "session_id": s.session_id, "door": s.door, "shopper": s.shopper,
                        "opened_at": ts(s.opened_at), "closed_at": ts(s.closed_at or wall),
                        "items": result.items, "total_cents": result.total_cents, "flags": result.flags,
                    }
                    tx.append(RecordType.SALE, body, now_ts)
                elif timed_out:
                    tx.append(RecordType.EVENT, {"kind": EventKind.SESSION_TIMEOUT, "session_id": s.session_id,
                                                 "shopper": s.shopper, "door": s.door}, now_ts)
                else:
                    tx.append(RecordType.EVENT, {"kind": EventKind.SESSION_EMPTY, "session_id": s.session_id,
                                                 "shopper": s.shopper, "door": s.door, "opened_at": ts(s.opened_at),
                                                 "closed_at": ts(s.closed_at)}, now_ts)
                tx.update_session(s.session_id, state="ended", ended_at=wall)
        except (RecordFailed, RecordConflict):
            return   # the session stays journaled; it settles again once the ledger accepts records
        machine.end_session()
        outcome = "sale" if not result.empty else ("session_timeout" if timed_out else "session_empty")
        log.info("session %s ended: %s %s", s.session_id, outcome,
                 f"total {result.total_cents} cents" if not result.empty else "")

    def _lane_change(self, lane: str, row: dict[str, Any], base: float | None, current: float | None,
                     at: dt.datetime) -> LaneChange:
        gtin = row.get("gtin")
        product = self.catalog.product(gtin) if gtin else None
        info = product_dict(product) if product else (row.get("product") or {})
        certified = isinstance(gtin, str) and bool(gtin) and self.catalog.lookup(gtin, at).certified
        return LaneChange(
            lane=lane, baseline_g=base, current_g=current, gtin=gtin, name=info.get("name"),
            cert_id=info.get("cert_id"), unit_weight_g=info.get("unit_weight_g"),
            tolerance_g=info.get("weight_tolerance_g"), unit_price_cents=row.get("price_cents") or 0,
            certified=certified,
        )


def product_dict(product: Any) -> dict[str, Any]:
    """What a sale item (and a lane's snapshot) needs of a catalog product."""
    return {
        "gtin": product.gtin, "name": product.name, "cert_id": product.cert_id,
        "unit_weight_g": product.unit_weight_g, "weight_tolerance_g": product.weight_tolerance_g,
    }
