"""The core: the one thread that owns the ledger, the sessions and the cabinet's state.

Every other thread (lock board, scales, camera, MQTT, control socket, catalog installer)
only posts messages to the core's inbox; the core decides, writes the ledger, and tells
devices what to do. So there are no locks around state, and the order of what happened is
the order of the inbox.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
import uuid
import zoneinfo
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.catalog import CatalogStore
from agent.commands import Command, Rejected, parse_payload, validate
from agent.config import Config
from agent.doors import (ActiveSession, Closed, DoorForced, DoorMachine, LeftOpen, LeftOpenCleared, Opened, Phase,
                         Reopened, Settle, Timing, resume_phase)
from agent.hardware import DeviceFault, DeviceRecovered, DoorFeedback, ScaleCycle, UnlockDone
from agent.ledger import Ledger
from agent.messages import CatalogOutcome, ControlCall, ScanSeen
from agent.mqtt_link import Inbound, LinkDown, LinkUp, PublishFailed
from agent.product_code import classify
from agent.reconcile import LaneChange, reconcile
from agent.status import StatusReporter
from agent.sync import Syncer
from agent.wire import canonical, format_ts, load_public_key, ts_from_epoch

log = logging.getLogger(__name__)

TICK_S = 0.05
BASELINE_WAIT_S = 3.0        # an open_door may wait this long (at least 2 x settle_s) for stable lanes
SEEN_PURGE_S = 3600.0
CLOCK_JUMP_S = 60.0


@dataclass
class PendingOpen:
    command: Command
    deadline: float


@dataclass
class LaneView:
    """What the core knows about a lane right now."""

    name: str
    door: int
    channel: int
    gross_g: float | None = None
    stable: bool = False


class Core:
    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.cid = cfg.cabinet.id
        self.clock = clock
        self.wall = wall
        self.tz = zoneinfo.ZoneInfo(cfg.cabinet.timezone)
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.key = load_public_key(cfg.platform.public_key)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(cfg.data_dir / "ledger.db")
        self.catalog = CatalogStore(cfg.data_dir / "catalog.db", self.key, cfg.cabinet.timezone)
        self.timing = Timing(cfg.lockboard.latch_release_s, cfg.session.open_timeout_s,
                             cfg.session.door_open_alarm_s, cfg.scale.settle_s)
        self.doors = {d.door: DoorMachine(d.door, self.timing) for d in cfg.doors}
        self.lock_of = {d.door: d.lock for d in cfg.doors}
        self.feedback: dict[int, bool | None] = {d.door: None for d in cfg.doors}
        self.lanes = {ln.lane: LaneView(ln.lane, ln.door, ln.channel) for ln in cfg.lanes}
        self.lane_of_channel = {ln.channel: ln.lane for ln in cfg.lanes}
        self.faults: set[str] = set()
        self.link: Any = None          # MqttLink, set by the runner
        self.lockboard: Any = None     # LockboardThread
        self.catalog_worker: Any = None
        self.pending_open: dict[int, PendingOpen] = {}
        self.pending_reply: dict[str, str] = {}   # session_id -> command id awaiting unlock result
        self.scan_waiters: list[Future[ScanSeen]] = []
        self.service_mode = self.ledger.meta("service_mode", "0") == "1"
        self.alarm_ledger_corrupt = self.ledger.rolled_back
        self.syncer = Syncer(self.ledger, self.cid, self._publish_batch, cfg.platform.max_batch,
                             cfg.platform.ack_timeout_s)
        self._last_housekeeping = -1e9
        self._last_ack_flush = -1e9
        self._clock_offset = self.wall() - self.clock()
        self._stopping = threading.Event()
        self.ledger_ok = True
        self._idle_reported: dict[str, float] = {}
        self._stale_reported: set[int | None] = set()
        self.reporter = StatusReporter(self)

    # -- topics ------------------------------------------------------------------------------
    def topic(self, suffix: str) -> str:
        return f"cab/v1/{self.cid}/{suffix}"

    def subscriptions(self) -> list[str]:
        return [self.topic("records/ack"), self.topic("cmd"), "cab/v1/catalog", "cab/v1/catalog/delta",
                self.topic("catalog")]

    # -- time ----------------------------------------------------------------------------------
    def now_dt(self) -> dt.datetime:
        """The wall clock as an aware UTC datetime (certification checks, lookups)."""
        return dt.datetime.fromtimestamp(self.wall(), dt.timezone.utc)

    def now_ts(self) -> str:
        return format_ts(self.now_dt())

    def ts(self, epoch: float | None) -> str | None:
        return None if epoch is None else ts_from_epoch(epoch)

    # -- ledger writes ---------------------------------------------------------------------------
    def record_event(self, kind: str, **fields: Any) -> None:
        body = {"kind": kind, **fields}
        try:
            self.ledger.append("event", body, self.now_ts())
        except (UnicodeEncodeError, TypeError, ValueError, RecursionError) as exc:
            log.error("event %s cannot be recorded, its content is not JSON text: %s", kind, exc)
            return
        except Exception as exc:  # noqa: BLE001 - sqlite3 errors, disk full
            self._ledger_failed(exc)
            return
        log.info("event %s %s", kind, json.dumps(fields, ensure_ascii=False))

    def _ledger_failed(self, exc: BaseException) -> None:
        log.error("the ledger cannot accept records: %s", exc)
        self.ledger_ok = False

    # -- startup -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume journaled sessions (never unlocking again) and record the start."""
        now = self.clock()
        wall = self.wall()
        for row in self.ledger.active_sessions():
            machine = self.doors.get(row["door"])
            if machine is None:
                log.error("journaled session %s is for door %s, which is no longer configured", row["session_id"],
                          row["door"])
                continue
            phase = resume_phase(row["opened_at"], row["closed_at"])
            session = ActiveSession(
                session_id=row["session_id"], door=row["door"], shopper=row["shopper"],
                unlock_at=now - max(0.0, wall - row["unlock_at"]), phase=phase,
                opened_at=row["opened_at"], closed_at=row["closed_at"],
                settle_from=now if phase is Phase.SETTLING else None, scans=list(row["scans"]),
            )
            machine.begin(session)
            log.warning("resuming session %s on door %d in phase %s (no second unlock)", session.session_id,
                        session.door, phase.value)
        lane_rows = self.ledger.lane_rows()
        for name in self.lanes:
            if name not in lane_rows:
                with self.ledger.transaction() as tx:
                    tx.set_lane(name, tare_g=0.0)
        self.record_event("agent_started", version=__version__)
        if self.alarm_ledger_corrupt:
            log.error("ledger_corrupt: the database was rolled back")
        else:
            bad, why = self.ledger.verify()
            if bad is not None:
                self.alarm_ledger_corrupt = True
                log.error("ledger_corrupt: %s", why)

    # -- main loop ------------------------------------------------------------------------------------
    def post(self, item: Any) -> None:
        self.inbox.put(item)

    def call(self, fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Run ``fn`` on the core thread (for control requests) and return its result."""
        call = ControlCall(fn)
        self.post(call)
        return call.future.result(timeout=timeout_s)

    def stop(self) -> None:
        self._stopping.set()
        self.post(None)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                item = self.inbox.get(timeout=TICK_S)
            except queue.Empty:
                item = None
            if item is not None:
                try:
                    self.handle(item)
                except Exception:  # noqa: BLE001 - input must never crash the daemon
                    log.exception("error handling %r", type(item).__name__)
            try:
                self.step()
            except Exception:  # noqa: BLE001
                log.exception("error in the core step")
        self.finish()

    def settling(self) -> bool:
        """A session is past its door and only waits for the scales (read from another thread)."""
        return any(m.session is not None and m.session.phase in (Phase.SETTLING, Phase.TIMED_OUT)
                   for m in self.doors.values())

    def finish(self) -> None:
        """SIGTERM: a running session stays journaled and resumes at the next start."""
        for machine in self.doors.values():
            if machine.session is not None:
                log.warning("stopping with session %s open; it resumes at the next start", machine.session.session_id)
        self.ledger.close()
        self.catalog.close()

    def handle(self, item: Any) -> None:
        if isinstance(item, DoorFeedback):
            self._on_feedback(item)
        elif isinstance(item, ScaleCycle):
            self._on_scales(item)
        elif isinstance(item, UnlockDone):
            self._on_unlock_done(item)
        elif isinstance(item, Inbound):
            self._on_inbound(item)
        elif isinstance(item, LinkUp):
            self.syncer.rewind(self.clock())
            self.publish_status(force=True)
        elif isinstance(item, LinkDown):
            pass
        elif isinstance(item, PublishFailed):
            self.syncer.rewind(self.clock())
        elif isinstance(item, (DeviceFault, DeviceRecovered)):
            self._on_device(item)
        elif isinstance(item, ControlCall):
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    item.future.set_exception(exc)
        elif isinstance(item, CatalogOutcome):
            self._on_catalog_outcome(item)
        elif isinstance(item, ScanSeen):
            self._on_scan(item)
        else:
            log.warning("unknown inbox item %r", item)

    def step(self) -> None:
        now = self.clock()
        wall = self.wall()
        for door, machine in self.doors.items():
            actions = machine.step(now, wall, self.feedback[door], self._door_lanes_stable(door))
            for action in actions:
                self._apply(machine, action)
        self._retry_pending_opens(now)
        self.syncer.pump(now, self.link is not None and self.link.connected)
        self.publish_status()
        if now - self._last_ack_flush > 1.0:
            self._last_ack_flush = now
            try:
                self.ledger.flush_acked()
            except Exception as exc:  # noqa: BLE001
                self._ledger_failed(exc)
        if now - self._last_housekeeping > 10.0:
            self._last_housekeeping = now
            self._housekeeping(now)

    # -- devices ----------------------------------------------------------------------------------
    def _on_feedback(self, fb: DoorFeedback) -> None:
        for door, lock in self.lock_of.items():
            self.feedback[door] = None if fb.states is None else fb.states.get(lock)

    def _on_scales(self, cycle: ScaleCycle) -> None:
        for ch, state in cycle.channels.items():
            lane = self.lane_of_channel.get(ch)
            if lane is not None:
                self.lanes[lane].gross_g = state.gross_g
                self.lanes[lane].stable = state.stable

    def _on_device(self, item: DeviceFault | DeviceRecovered) -> None:
        if item.device == "lockboard":
            alarm = "lock_fault"
        elif item.device == "scale":
            alarm = f"scale_fault:{item.unit}"
        else:
            alarm = "camera_fault"
        if isinstance(item, DeviceFault):
            self.faults.add(alarm)
            if item.device == "lockboard":
                self.record_event("lock_fault", board=item.unit, detail=item.detail)
            elif item.device == "scale":
                self.record_event("scale_fault", channel=item.unit, detail=item.detail)
            else:
                self.record_event("camera_fault", detail=item.detail)
        else:
            self.faults.discard(alarm)
            extra: dict[str, Any] = {}
            if item.device == "lockboard":
                extra["board"] = item.unit
            elif item.device == "scale":
                extra["channel"] = item.unit
            self.record_event("hardware_recovered", device=item.device, **extra)
        self.publish_status()

    def lane_weight(self, lane: str, rows: dict[str, dict[str, Any]] | None = None) -> float | None:
        """The lane's weight after the software tare and calibration factor."""
        view = self.lanes[lane]
        if view.gross_g is None:
            return None
        row = (rows or self.ledger.lane_rows()).get(lane, {})
        return round((view.gross_g - (row.get("tare_g") or 0.0)) * (row.get("factor") or 1.0), 3)

    def _door_ready(self, door: int) -> bool:
        """A session can start: the door's state is known and its lanes have a stable baseline.
        (Right after a start neither is known yet; an open_door then waits a moment.)"""
        return self.feedback[door] is not None and self._door_lanes_stable(door)

    def _door_lanes_stable(self, door: int) -> bool:
        return all(v.stable and v.gross_g is not None for v in self.lanes.values() if v.door == door)

    # -- platform messages ---------------------------------------------------------------------------
    def _on_inbound(self, msg: Inbound) -> None:
        topic = msg.topic
        if topic == self.topic("records/ack"):
            self._on_ack(msg.payload)
        elif topic == self.topic("cmd"):
            self._on_command(msg.payload)
        elif topic in ("cab/v1/catalog", "cab/v1/catalog/delta", self.topic("catalog")):
            if not msg.payload:
                log.info("empty payload on %s (a cleared retained catalog) ignored", topic)
            elif self.catalog_worker is not None:
                self.catalog_worker.submit_bytes(msg.payload, topic)
        else:
            log.warning("message on unexpected topic %s ignored", topic)

    def _on_ack(self, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
            upto = obj["upto"]
            if not isinstance(upto, int) or isinstance(upto, bool) or upto < 0:
                raise ValueError("upto is not a non-negative integer")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("malformed ack ignored (%s): %r", exc, payload[:200])
            return
        self.syncer.on_ack(upto, self.clock())

    def _on_command(self, payload: bytes) -> None:
        try:
            obj = parse_payload(payload)
            cmd = validate(obj, key=self.key, now=self.wall(), skew_s=self.cfg.platform.clock_skew_s,
                           config=self.cfg, seen=self.ledger.command_seen)
        except Rejected as rej:
            self._reject(rej)
            return
        log.info("command %s %s accepted", cmd.type, cmd.id)
        if cmd.type == "open_door":
            # The id is remembered in the same commit that journals the session: one fsync
            # between the command and the unlock frame.
            try:
                self._cmd_open_door(cmd)
            except Rejected as rej:
                self._remember(cmd)
                self._reject(rej)
            return
        if not self._remember(cmd):
            return
        try:
            if cmd.type == "status":
                self.publish_status(force=True)
                self.reply(cmd.id, True, result={"published": True})
            elif cmd.type == "resend":
                self._cmd_resend(cmd)
            elif cmd.type == "set_lane":
                self._cmd_set_lane(cmd)
        except Rejected as rej:
            self._reject(rej)

    def _remember(self, cmd: Command) -> bool:
        """Persist the command id (replay protection across restarts); False if the ledger failed."""
        try:
            with self.ledger.transaction() as tx:
                tx.remember_command(cmd.id, self._seen_until(cmd))
        except Exception as exc:  # noqa: BLE001
            self._ledger_failed(exc)
            self._reject(Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type))
            return False
        return True

    def _seen_until(self, cmd: Command) -> float:
        return cmd.expires_at + self.cfg.platform.clock_skew_s

    def _reject(self, rej: Rejected) -> None:
        log.warning("command %s (%s) rejected: %s", rej.command_id, rej.type, rej.reason)
        self.record_event("command_rejected", command_id=rej.command_id, type=rej.type, reason=rej.reason)
        if rej.command_id is not None:
            self.reply(rej.command_id, False, error=rej.reason)

    def reply(self, command_id: str, ok: bool, *, error: str | None = None, result: Any = None) -> None:
        body = {"id": command_id, "ok": ok, "at": self.now_ts(), "error": error, "result": result if result else {}}
        if self.link is not None:
            self.link.publish(self.topic("cmd/reply"), canonical(body), qos=1)

    def _publish_batch(self, payload: bytes) -> int | None:
        if self.link is None:
            return None
        return self.link.publish(self.topic("records"), payload, qos=1)

    def _cmd_resend(self, cmd: Command) -> None:
        from_seq = cmd.args["from_seq"]
        self.syncer.rewind(self.clock(), from_seq - 1)
        self.reply(cmd.id, True, result={"from_seq": from_seq, "last_seq": self.ledger.last_seq})

    def _cmd_set_lane(self, cmd: Command) -> None:
        lane, code, price = cmd.args["lane"], cmd.args["gtin"], cmd.args["price_cents"]
        look = self.catalog.lookup(code, self.now_dt())
        if not look.certified:
            raise Rejected(f"not_certified: {code} is not certified now ({look.reason})", cmd.id, cmd.type)
        self.assign_lane(lane, look.gtin, price)
        self.reply(cmd.id, True, result={"lane": lane, "gtin": look.gtin, "price_cents": price})

    def assign_lane(self, lane: str, gtin: str | None, price_cents: int | None) -> None:
        product = self.catalog.product(gtin) if gtin else None
        snapshot = json.dumps(_product_dict(product)) if product else None
        with self.ledger.transaction() as tx:
            tx.set_lane(lane, gtin=gtin, price_cents=price_cents, product=snapshot)
        self.invalidate_alarms()
        self.publish_status()

    # -- sessions ---------------------------------------------------------------------------------------
    def _cmd_open_door(self, cmd: Command) -> None:
        door = cmd.args["door"]
        self._check_can_open(cmd, door)
        if door in self.pending_open:
            raise Rejected(f"not_allowed: door {door} is busy with another session", cmd.id, cmd.type)
        if not self._door_ready(door):
            if not self._remember(cmd):
                return
            self.pending_open[door] = PendingOpen(cmd, self.clock() + max(BASELINE_WAIT_S, 2 * self.cfg.scale.settle_s))
            log.info("open_door %s waits for stable lanes behind door %d", cmd.id, door)
            return
        self._start_session(cmd)

    def _check_can_open(self, cmd: Command, door: int) -> None:
        if self.service_mode:
            raise Rejected("not_allowed: the cabinet is in service mode", cmd.id, cmd.type)
        if self.doors[door].busy:
            raise Rejected(f"not_allowed: door {door} is busy with another session", cmd.id, cmd.type)
        if not self.ledger_ok:
            raise Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type)
        if "lock_fault" in self.faults:
            raise Rejected("not_allowed: the lock board is not answering", cmd.id, cmd.type)
        for view in self.lanes.values():
            if view.door == door and f"scale_fault:{view.channel}" in self.faults:
                raise Rejected(f"not_allowed: the scale of lane {view.name} is not answering", cmd.id, cmd.type)

    def _retry_pending_opens(self, now: float) -> None:
        for door, pending in list(self.pending_open.items()):
            if self._door_ready(door):
                del self.pending_open[door]
                try:
                    self._check_can_open(pending.command, door)
                    self._start_session(pending.command)
                except Rejected as rej:
                    self._reject(rej)
            elif now > pending.deadline:
                del self.pending_open[door]
                why = ("the lock board has not answered yet" if self.feedback[door] is None
                       else "the scales are not stable")
                self._reject(Rejected(f"not_allowed: {why}", pending.command.id, "open_door"))

    def _start_session(self, cmd: Command) -> None:
        door = cmd.args["door"]
        rows = self.ledger.lane_rows()
        baseline = {v.name: self.lane_weight(v.name, rows) for v in self.lanes.values() if v.door == door}
        now, wall = self.clock(), self.wall()
        try:
            with self.ledger.transaction() as tx:
                tx.remember_command(cmd.id, self._seen_until(cmd))
                tx.open_session(session_id=cmd.args["session_id"], command_id=cmd.id, door=door,
                                shopper=cmd.args["shopper"], auth=cmd.args["auth"],
                                baseline=baseline, unlock_at=wall)
        except Exception as exc:  # noqa: BLE001 - e.g. a session id used before
            if "UNIQUE" in str(exc):
                raise Rejected("invalid_args: session_id was used before", cmd.id, cmd.type) from None
            self._ledger_failed(exc)
            raise Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type) from None
        session = ActiveSession(session_id=cmd.args["session_id"], door=door, shopper=cmd.args["shopper"],
                                unlock_at=now)
        self.doors[door].begin(session)
        self.pending_reply[session.session_id] = cmd.id
        # Rule 1: the baseline is journaled (committed above) before the unlock frame is sent.
        if self.lockboard is not None:
            self.lockboard.unlock(self.lock_of[door], session.session_id)
        log.info("session %s: door %d unlocking for %s (baseline %s)", session.session_id, door,
                 session.shopper, baseline)
        self.publish_status()

    def _on_unlock_done(self, done: UnlockDone) -> None:
        door = next((d for d, lock in self.lock_of.items() if lock == done.lock), None)
        if door is None:
            return
        machine = self.doors[door]
        machine.last_pulse_at = done.at
        if machine.session is not None and machine.session.session_id == done.token:
            machine.session.unlock_at = done.at
        command_id = self.pending_reply.pop(done.token, None)
        if command_id is not None:
            if done.ok:
                self.reply(command_id, True, result={"session_id": done.token, "door": door, "unlocked": True})
            else:
                self.reply(command_id, False, error=f"lock_fault: unlock not confirmed ({done.detail})",
                           result={"session_id": done.token, "door": door, "unlocked": False})

    def _apply(self, machine: DoorMachine, action: Any) -> None:
        s = machine.session
        if isinstance(action, Opened):
            self._journal(action.session_id, opened_at=action.at, state="open")
            log.info("session %s: door %d opened", action.session_id, machine.door)
        elif isinstance(action, Closed):
            self._journal(action.session_id, closed_at=action.at, state="settling")
            log.info("session %s: door %d shut, settling", action.session_id, machine.door)
        elif isinstance(action, Reopened):
            self._journal(action.session_id, closed_at=None, state="open")
        elif isinstance(action, Settle) and s is not None:
            self._settle(machine, s, action.timed_out, action.weigh)
        elif isinstance(action, DoorForced):
            self.record_event("door_forced", door=action.door)
        elif isinstance(action, LeftOpen):
            self.record_event("door_left_open", door=action.door, session_id=action.session_id, open_s=action.open_s)
        elif isinstance(action, LeftOpenCleared):
            log.info("door %d shut again after the left-open alarm", action.door)
        self.publish_status()

    def _journal(self, session_id: str, **fields: Any) -> None:
        try:
            with self.ledger.transaction() as tx:
                tx.update_session(session_id, **fields)
        except Exception as exc:  # noqa: BLE001
            self._ledger_failed(exc)

    def _settle(self, machine: DoorMachine, s: ActiveSession, timed_out: bool, weigh: bool = True) -> None:
        journal = next((r for r in self.ledger.active_sessions() if r["session_id"] == s.session_id), None)
        baseline: dict[str, float | None] = journal["baseline"] if journal else {}
        rows = self.ledger.lane_rows()
        at = self.now_dt()
        changes = []
        for view in self.lanes.values():
            if view.door != machine.door or not weigh:
                continue
            base = baseline.get(view.name)
            current = self.lane_weight(view.name, rows)
            if base is None or current is None:
                continue
            changes.append(self._lane_change(view.name, rows.get(view.name, {}), base, current, at))
        result = reconcile(changes, s.scans)
        wall = self.wall()
        try:
            with self.ledger.transaction() as tx:
                if not result.empty:
                    body = {
                        "sale_id": str(uuid.uuid4()), "session_id": s.session_id, "door": s.door, "shopper": s.shopper,
                        "opened_at": self.ts(s.opened_at), "closed_at": self.ts(s.closed_at or wall),
                        "items": result.items, "total_cents": result.total_cents, "flags": result.flags,
                    }
                    tx.append("sale", body, self.now_ts())
                elif timed_out:
                    tx.append("event", {"kind": "session_timeout", "session_id": s.session_id,
                                        "shopper": s.shopper, "door": s.door}, self.now_ts())
                else:
                    tx.append("event", {"kind": "session_empty", "session_id": s.session_id, "shopper": s.shopper,
                                        "door": s.door, "opened_at": self.ts(s.opened_at),
                                        "closed_at": self.ts(s.closed_at)}, self.now_ts())
                tx.update_session(s.session_id, state="ended", ended_at=wall)
        except Exception as exc:  # noqa: BLE001
            self._ledger_failed(exc)
            return
        machine.end_session()
        outcome = "sale" if not result.empty else ("session_timeout" if timed_out else "session_empty")
        log.info("session %s ended: %s %s", s.session_id, outcome,
                 f"total {result.total_cents} cents" if not result.empty else "")

    def _lane_change(self, lane: str, row: dict[str, Any], base: float, current: float,
                     at: dt.datetime) -> LaneChange:
        gtin = row.get("gtin")
        product = self.catalog.product(gtin) if gtin else None
        info = _product_dict(product) if product else (row.get("product") or {})
        certified = bool(gtin) and self.catalog.lookup(gtin, at).certified
        return LaneChange(
            lane=lane, baseline_g=base, current_g=current, gtin=gtin, name=info.get("name"),
            cert_id=info.get("cert_id"), unit_weight_g=info.get("unit_weight_g"),
            tolerance_g=info.get("weight_tolerance_g"), unit_price_cents=row.get("price_cents") or 0,
            certified=certified,
        )

    # -- camera scans -----------------------------------------------------------------------------------
    def _on_scan(self, scan: ScanSeen) -> None:
        for fut in self.scan_waiters:
            if not fut.done():
                fut.set_result(scan)
        self.scan_waiters.clear()
        at = self.now_dt()
        active = [m.session for m in self.doors.values() if m.session is not None and m.session.phase is Phase.OPEN]
        if scan.gtin is not None:
            for s in active:
                if scan.gtin not in s.scans:
                    s.scans.append(scan.gtin)
                    self._journal(s.session_id, scans=s.scans)
        context = "session" if active else ("restock" if self.service_mode else "idle")
        if context == "restock":
            return  # restock scans are judged by the restock command itself
        gtin, bad = classify(scan.text, scan.symbology)
        if gtin is None and bad is None:
            return  # not a product code at all (a lot number, a URL, ...)
        reason = bad
        if gtin is not None:
            look = self.catalog.lookup(gtin, at)
            if look.certified:
                return
            reason = look.reason
        if context == "idle":
            key = f"idle_scan:{scan.gtin or scan.text}"
            last = self._idle_reported.get(key)
            if last is not None and self.clock() - last < 3600:
                return
            self._idle_reported[key] = self.clock()
        self.record_event("uncertified_scan", code=scan.text, gtin=gtin, symbology=scan.symbology,
                          context=context, reason=reason)

    # -- catalog -------------------------------------------------------------------------------------------
    def _on_catalog_outcome(self, out: CatalogOutcome) -> None:
        if out.error is not None:
            err = out.error
            if err.reason == "stale":
                # After a delta, the retained (older) snapshot comes back on every reconnect:
                # record its rejection once, not at every reconnect.
                if err.version in self._stale_reported:
                    log.info("catalog version %s is stale again (already recorded)", err.version)
                    return
                self._stale_reported.add(err.version)
            self.record_event("catalog_rejected", version=err.version, reason=err.reason)
            if err.reason == "base_mismatch" and self.link is not None:
                self.link.resubscribe("cab/v1/catalog")
            return
        res = out.result
        if res.outcome == "same_version":
            return
        self.record_event("catalog_installed", version=res.version, products=res.products, delta=res.delta)
        self.invalidate_alarms()
        self.publish_status(force=True)

    # -- status (agent.status) -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.reporter.status()

    def publish_status(self, force: bool = False) -> None:
        self.reporter.publish(force)

    def invalidate_alarms(self) -> None:
        self.reporter.invalidate()

    def offline_status(self) -> bytes:
        return self.reporter.offline_status()

    # -- housekeeping ------------------------------------------------------------------------------------------
    def _housekeeping(self, now: float) -> None:
        offset = self.wall() - now
        if abs(offset - self._clock_offset) > CLOCK_JUMP_S:
            self.record_event("clock_jump", delta_s=round(offset - self._clock_offset, 3))
        self._clock_offset = offset
        self._idle_reported = {k: t for k, t in self._idle_reported.items() if now - t < 3600}
        try:
            with self.ledger.transaction() as tx:
                tx.forget_commands_before(self.wall())
        except Exception as exc:  # noqa: BLE001
            self._ledger_failed(exc)
        days = self.cfg.platform.retain_synced_days
        cutoff = ts_from_epoch(self.wall() - days * 86400)
        try:
            pruned = self.ledger.prune_synced(cutoff)
            if pruned:
                log.info("pruned %d synced records older than %s days", pruned, days)
        except Exception as exc:  # noqa: BLE001
            log.warning("pruning failed: %s", exc)
        if not self.ledger_ok:
            try:
                self.ledger.execute("SELECT 1").fetchone()
                with self.ledger.transaction():
                    pass
                self.ledger_ok = True
            except Exception:  # noqa: BLE001
                pass


def _product_dict(product: Any) -> dict[str, Any]:
    return {
        "gtin": product.gtin, "name": product.name, "cert_id": product.cert_id,
        "unit_weight_g": product.unit_weight_g, "weight_tolerance_g": product.weight_tolerance_g,
    }

