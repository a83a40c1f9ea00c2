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
import zoneinfo
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.store.catalog import CatalogStore
from agent.rules.commands import Command, Rejected, parse_payload, validate
from agent.config import Config
from agent.rules.doors import (ActiveSession, DoorMachine, Phase,
                         Timing, resume_phase)
from agent.store.ledger import Ledger
from agent.events import (CatalogOutcome, ControlCall, DeviceFault, DeviceRecovered, DoorFeedback, Inbound, LinkDown,
                          LinkUp, PublishFailed, ScaleCycle, ScanSeen, UnlockDone)
from drivers.gs1 import classify
from agent.sessions import SessionRunner, product_dict
from agent.status import StatusReporter
from agent.sync import Syncer
from agent.protocol import canonical, format_ts, load_public_key, ts_from_epoch

log = logging.getLogger(__name__)

TICK_S = 0.05
SEEN_PURGE_S = 3600.0
CLOCK_JUMP_S = 60.0
IDLE_REPORT_EVERY_S = 3600.0   # an uncertified code shown to an idle cabinet is reported once an hour


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
        self.scan_waiters: list[Future[ScanSeen]] = []
        self.unlock_waiters: dict[str, Future[UnlockDone]] = {}
        self.stopping = False   # set at SIGTERM: no new sessions
        self.service_mode = self.ledger.meta("service_mode", "0") == "1"
        self.alarm_ledger_corrupt = self.ledger.rolled_back
        self.syncer = Syncer(self.ledger, self.cid, self._publish_batch, cfg.platform.max_batch,
                             cfg.platform.ack_timeout_s)
        self._last_housekeeping = -1e9
        self._last_ack_flush = -1e9
        self._clock_offset = self.wall() - self.clock()
        self._stopping = threading.Event()
        self.ledger_ok = True
        self._stale_reported: set[int | None] = set()
        self.reporter = StatusReporter(self)
        self.sessions = SessionRunner(self)

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
            self.ledger_failed(exc)
            return
        log.info("event %s %s", kind, json.dumps(fields, ensure_ascii=False))

    def ledger_failed(self, exc: BaseException) -> None:
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
            self.sessions.on_unlock_done(item)
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
        self._step_doors(now, None)   # timers only: a reading counts once, at its poll time
        self.sessions.retry_pending(now)
        self.syncer.pump(now, self.link is not None and self.link.connected)
        self.publish_status()
        if now - self._last_ack_flush > 1.0:
            self._last_ack_flush = now
            try:
                self.ledger.flush_acked()
            except Exception as exc:  # noqa: BLE001
                self.ledger_failed(exc)
        if now - self._last_housekeeping > 10.0:
            self._last_housekeeping = now
            self._housekeeping(now)

    # -- devices ----------------------------------------------------------------------------------
    def _on_feedback(self, fb: DoorFeedback) -> None:
        for door, lock in self.lock_of.items():
            self.feedback[door] = None if fb.states is None else fb.states.get(lock)
        self._step_doors(fb.at, self.feedback)

    def _step_doors(self, at: float, readings: dict[int, bool | None] | None) -> None:
        """Advance every door machine to ``at``, with the poll's readings when there are some."""
        wall = self.wall()
        for door, machine in self.doors.items():
            reading = readings.get(door) if readings is not None else None
            for action in machine.step(at, wall, reading, self.door_lanes_stable(door)):
                self.sessions.apply(machine, action)

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

    def door_ready(self, door: int) -> bool:
        """A session can start: the door's state is known and its lanes have a stable baseline.
        (Right after a start neither is known yet; an open_door then waits a moment.)"""
        return self.feedback[door] is not None and self.door_lanes_stable(door)

    def door_lanes_stable(self, door: int) -> bool:
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
            if rej.remember_until is not None and rej.command_id is not None:
                self.remember_id(rej.command_id, rej.remember_until)
            self.reject(rej)
            return
        log.info("command %s %s accepted", cmd.type, cmd.id)
        if cmd.type == "open_door":
            # The id is remembered in the same commit that journals the session: one fsync
            # between the command and the unlock frame.
            try:
                self.sessions.open_door(cmd)
            except Rejected as rej:
                self.remember(cmd)
                self.reject(rej)
            return
        if not self.remember(cmd):
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
            self.reject(rej)

    def remember(self, cmd: Command) -> bool:
        """Persist the command id (replay protection across restarts); False if the ledger failed."""
        if self.remember_id(cmd.id, self.seen_until(cmd)):
            return True
        self.reject(Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type))
        return False

    def remember_id(self, command_id: str, until: float) -> bool:
        try:
            with self.ledger.transaction() as tx:
                tx.remember_command(command_id, until)
        except Exception as exc:  # noqa: BLE001
            self.ledger_failed(exc)
            return False
        return True

    def seen_until(self, cmd: Command) -> float:
        return cmd.expires_at + self.cfg.platform.clock_skew_s

    def reject(self, rej: Rejected) -> None:
        log.warning("command %s (%s) rejected: %s", rej.command_id, rej.type, rej.reason)
        # what an unauthenticated sender chose is clipped, so that no record outgrows a batch
        self.record_event("command_rejected", command_id=_clip(rej.command_id), type=_clip(rej.type),
                          reason=_clip(rej.reason, 500))
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
        snapshot = json.dumps(product_dict(product)) if product else None
        with self.ledger.transaction() as tx:
            tx.set_lane(lane, gtin=gtin, price_cents=price_cents, product=snapshot)
        self.invalidate_alarms()
        self.publish_status()

    def journal(self, session_id: str, **fields: Any) -> None:
        try:
            with self.ledger.transaction() as tx:
                tx.update_session(session_id, **fields)
        except Exception as exc:  # noqa: BLE001
            self.ledger_failed(exc)

    # -- camera scans -----------------------------------------------------------------------------------
    def _on_scan(self, scan: ScanSeen) -> None:
        consumed = False
        for fut in self.scan_waiters:
            if not fut.done():
                fut.set_result(scan)
                consumed = True
        self.scan_waiters.clear()
        at = self.now_dt()
        active = [m.session for m in self.doors.values() if m.session is not None and m.session.phase is Phase.OPEN]
        if scan.gtin is not None:
            for s in active:
                if scan.gtin not in s.scans:
                    s.scans.append(scan.gtin)
                    self.journal(s.session_id, scans=s.scans)
        context = "session" if active else ("restock" if self.service_mode else "idle")
        if consumed:
            return  # a waiting `cabinetctl restock` judges (and records) this scan itself
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
            # at most once per code per hour, also across restarts (kept beside the ledger)
            key = gtin or scan.text
            if not self.ledger.idle_report_due(key, self.wall(), IDLE_REPORT_EVERY_S):
                return
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
        try:
            with self.ledger.transaction() as tx:
                tx.forget_commands_before(self.wall())
        except Exception as exc:  # noqa: BLE001
            self.ledger_failed(exc)
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


def _clip(text: str | None, limit: int = 200) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + "..."
