"""The core: the one thread that owns the ledger, the sessions and the cabinet's state.

Every other thread (lock board, scales, camera, MQTT, control socket, catalog installer)
only posts messages to the core's inbox; the core decides, writes the ledger, and tells
devices what to do. So there are no locks around state, and the order of what happened is
the order of the inbox. It is built with its ports (agent.ports) and a clock, so a test runs
it in-process with fakes: ``core.handle(item)`` and ``core.step()`` are all a test needs.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
import zoneinfo
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import __version__
from agent.clock import Clock
from agent.config import Config
from agent.errors import CatalogError, CatalogStoreError
from agent.events import (
    CameraDegraded,
    CatalogOutcome,
    ControlCall,
    DeviceFault,
    DeviceKind,
    DeviceRecovered,
    DoorFeedback,
    Inbound,
    LinkDown,
    LinkUp,
    LockProbed,
    PublishFailed,
    ScaleCycle,
    ScanSeen,
    UnlockDone,
)
from agent.ports import Ports
from agent.protocol import (
    CLOCK_JUMP_S,
    MAX_ERROR_CHARS,
    Alarm,
    EventKind,
    Topics,
    canonical,
    load_public_key,
    ts_from_epoch,
)
from agent.recorder import Recorder, RecordFailed
from agent.rules.commands import Command, Rejected, parse_payload, validate
from agent.rules.doors import ActiveSession, Phase, Timing, resume_phase
from agent.rules.ratelimit import RejectionLimiter, SlidingWindow
from agent.sessions import SessionRunner, product_dict
from agent.state import CabinetState
from agent.status import StatusSchedule, StatusView
from agent.store.catalog import CatalogStore
from agent.store.ledger import Ledger
from agent.sync import Syncer
from drivers.gs1 import classify

log = logging.getLogger(__name__)

TICK_S = 0.05
IDLE_REPORT_EVERY_S = 3600.0   # an uncertified code shown to an idle cabinet is reported once an hour
ACK_FLUSH_S = 1.0
HOUSEKEEPING_S = 10.0
# Seen command ids are kept this long past their expiry, and purged by a time that a forward
# jump of the wall clock cannot advance: a clock set back later must not make a captured
# command valid again while its id is forgotten.
SEEN_EXTRA_S = 7 * 86400.0


@dataclass(frozen=True)
class _DeviceRules:
    """How one kind of device's faults show: its alarm, its fault event, its unit's field name."""

    alarm: Callable[[int | None], str]
    fault_event: EventKind
    unit_field: str | None


_DEVICES: dict[DeviceKind, _DeviceRules] = {
    DeviceKind.LOCKBOARD: _DeviceRules(lambda _unit: Alarm.LOCK_FAULT, EventKind.LOCK_FAULT, "board"),
    DeviceKind.SCALE: _DeviceRules(lambda unit: Alarm.scale_fault(unit or 0), EventKind.SCALE_FAULT, "channel"),
    DeviceKind.CAMERA: _DeviceRules(lambda _unit: Alarm.CAMERA_FAULT, EventKind.CAMERA_FAULT, None),
}


class Core:
    def __init__(self, cfg: Config, *, ports: Ports | None = None, clock: Clock | None = None,
                 inbox: queue.Queue[Any] | None = None, heartbeat: Callable[[], None] | None = None,
                 heartbeat_s: float = 10.0) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.cabinet.id)
        self.clock = clock or Clock()
        self.ports = ports or Ports()
        self.tz = zoneinfo.ZoneInfo(cfg.cabinet.timezone)
        self.inbox: queue.Queue[Any] = inbox if inbox is not None else queue.Queue()
        self.key = load_public_key(cfg.platform.public_key)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(cfg.data_dir / "ledger.db")
        self.catalog = open_catalog_cache(cfg.data_dir / "catalog.db", self.key, cfg.cabinet.timezone)
        timing = Timing(cfg.lockboard.latch_release_s, cfg.session.open_timeout_s,
                        cfg.session.door_open_alarm_s, cfg.scale.settle_s)
        self.state = CabinetState(cfg, timing)
        self.state.service_mode = self.ledger.meta("service_mode", "0") == "1"
        self.state.ledger_corrupt = self.ledger.rolled_back
        self.recorder = Recorder(self.ledger, self.clock)
        self.view = StatusView(cfg, self.state, self.recorder, self.catalog, self.clock)
        self.schedule = StatusSchedule(cfg.platform.status_interval_s)
        self.sessions = SessionRunner(self.state, self.recorder, self.catalog, self.clock, cfg, self,
                                      storage_low=self.view.storage_low)
        self.syncer = Syncer(self.ledger, cfg.cabinet.id, self._publish_batch, cfg.platform.max_batch,
                             cfg.platform.ack_timeout_s)
        self.command_rejections = RejectionLimiter("command")
        self.catalog_rejections = RejectionLimiter("catalog")
        self.refusal_replies = SlidingWindow()
        self.scan_waiters: list[Future[ScanSeen]] = []
        self.unlock_waiters: dict[str, Future[UnlockDone]] = {}
        self._last_housekeeping = -1e9
        self._last_ack_flush = -1e9
        self._clock_offset = self.clock.wall() - self.clock.monotonic()
        self._trusted_offset = self._clock_offset   # wall time as the monotonic clock has carried it
        self._stopping = threading.Event()
        self._stale_reported: set[int | None] = set()
        self._heartbeat = heartbeat
        self._heartbeat_s = heartbeat_s
        self._last_beat = -1e9
        self.finished = False

    # -- startup -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume journaled sessions (never unlocking again) and record the start."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        for row in self.ledger.active_sessions():
            machine = self.state.doors.get(row["door"])
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
                door_read=False,
            )
            machine.begin(session)
            log.warning("resuming session %s on door %d in phase %s (no second unlock)", session.session_id,
                        session.door, phase.value)
        lane_rows = self.ledger.lane_rows()
        missing = [name for name in self.state.lanes if name not in lane_rows]
        if missing:
            with self.ledger.transaction() as tx:
                for name in missing:
                    tx.set_lane(name, tare_g=0.0)
        if self.state.ledger_corrupt:
            log.error("ledger_corrupt: the database was rolled back")
        else:
            bad, why = self.ledger.verify()
            if bad is not None:
                self.state.ledger_corrupt = True
                log.error("ledger_corrupt: %s", why)

    def record_started(self) -> None:
        """``agent_started``: every part runs (mqtt.md v1.1: a start that fails records nothing)."""
        self.recorder.event(EventKind.AGENT_STARTED, version=__version__)

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
            else:
                self._beat()
        self.finish()

    def _beat(self) -> None:
        """The watchdog is fed from here only: a core loop that stalls or keeps failing starves it."""
        if self._heartbeat is None:
            return
        now = self.clock.monotonic()
        if now - self._last_beat >= self._heartbeat_s:
            self._last_beat = now
            self._heartbeat()

    def settling(self) -> bool:
        """A session is past its door and only waits for the scales (read from another thread)."""
        return self.state.settling()

    def finish(self) -> None:
        """SIGTERM: a running session stays journaled and resumes at the next start."""
        if self.finished:
            return
        self.finished = True
        for machine in self.state.doors.values():
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
        elif isinstance(item, LockProbed):
            self.sessions.on_lock_probed(item.ok)
        elif isinstance(item, CameraDegraded):
            self._on_camera_degraded(item)
        elif isinstance(item, Inbound):
            self._on_inbound(item)
        elif isinstance(item, LinkUp):
            self.syncer.rewind(self.clock.monotonic())
            self.publish_status(force=True)
        elif isinstance(item, LinkDown):
            pass
        elif isinstance(item, PublishFailed):
            self.syncer.rewind(self.clock.monotonic())
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
        now = self.clock.monotonic()
        self._step_doors(now, None)   # timers only: a reading counts once, at its poll time
        self.sessions.retry_pending(now)
        self.syncer.pump(now, self.link_connected)
        for limiter in (self.command_rejections, self.catalog_rejections):
            report = limiter.due(now)
            if report is not None:
                self.recorder.event(EventKind.REJECTIONS_SUPPRESSED, what=report.what, count=report.count,
                                    since=ts_from_epoch(report.since_wall))
        self.publish_status()
        if now - self._last_ack_flush > ACK_FLUSH_S:
            self._last_ack_flush = now
            try:
                self.ledger.flush_acked()
            except Exception as exc:  # noqa: BLE001 - sqlite3 errors, disk full
                self.recorder.failed(exc)
        if now - self._last_housekeeping > HOUSEKEEPING_S:
            self._last_housekeeping = now
            self._housekeeping(now)

    @property
    def link_connected(self) -> bool:
        return self.ports.link is not None and self.ports.link.connected

    # -- the Outbox the sessions use ------------------------------------------------------------------
    def reply(self, command_id: str | None, ok: bool, *, error: str | None = None, result: Any = None) -> None:
        body = {"id": command_id, "ok": ok, "at": self.clock.now_ts(), "error": _clip(error, MAX_ERROR_CHARS),
                "result": result if result else {}}
        if self.ports.link is not None:
            self.ports.link.publish(self.topics.reply, canonical(body), qos=1)

    def reject(self, rej: Rejected) -> None:
        """Record (within the rate limit) and answer (within its own) a refused command (mqtt.md v1.1)."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        if self.command_rejections.admit(now, wall):
            log.warning("command %s (%s) rejected: %s", rej.command_id, _clip(rej.type), _clip(rej.reason))
            # what an unauthenticated sender chose is clipped, so that no record outgrows a batch
            self.recorder.event(EventKind.COMMAND_REJECTED, command_id=_clip(rej.command_id), type=_clip(rej.type),
                                reason=_clip(rej.reason, 500))
        if self.refusal_replies.admit(now):
            self.reply(rej.command_id, False, error=rej.reason)

    def unlock(self, door: int, token: str) -> None:
        if self.ports.lockboard is not None:
            self.ports.lockboard.unlock(self.state.lock_of[door], token)

    def probe_lockboard(self) -> None:
        if self.ports.lockboard is not None:
            self.ports.lockboard.probe()

    def status_changed(self) -> None:
        self.publish_status()

    # -- devices ----------------------------------------------------------------------------------
    def _on_feedback(self, fb: DoorFeedback) -> None:
        for door, lock in self.state.lock_of.items():
            self.state.feedback[door] = None if fb.states is None else fb.states.get(lock)
        self._step_doors(fb.at, self.state.feedback)

    def _step_doors(self, at: float, readings: dict[int, bool | None] | None) -> None:
        """Advance every door machine to ``at``, with the poll's readings when there are some."""
        wall = self.clock.wall()
        for door, machine in self.state.doors.items():
            reading = readings.get(door) if readings is not None else None
            for action in machine.step(at, wall, reading, self.state.door_lanes_stable(door)):
                self.sessions.apply(machine, action)

    def _on_scales(self, cycle: ScaleCycle) -> None:
        for ch, reading in cycle.channels.items():
            lane = self.state.lane_of_channel.get(ch)
            if lane is not None:
                self.state.lanes[lane].gross_g = reading.gross_g
                self.state.lanes[lane].stable = reading.stable

    def _on_unlock_done(self, done: UnlockDone) -> None:
        waiter = self.unlock_waiters.pop(done.token, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(done)   # a service unlock's cabinetctl is waiting for it
        self.sessions.on_unlock_done(done)

    def _on_device(self, item: DeviceFault | DeviceRecovered) -> None:
        rules = _DEVICES.get(item.device)
        if rules is None:
            log.warning("fault report from an unknown device %r ignored", item.device)
            return
        alarm = rules.alarm(item.unit)
        unit = {rules.unit_field: item.unit} if rules.unit_field else {}
        if isinstance(item, DeviceFault):
            self.state.faults.add(alarm)
            if item.device == DeviceKind.LOCKBOARD:
                # a silent board's doors are unknown, not as they were last seen
                self.state.feedback = dict.fromkeys(self.state.feedback)
            self.recorder.event(rules.fault_event, **unit, detail=item.detail)
        else:
            self.state.faults.discard(alarm)
            self.recorder.event(EventKind.HARDWARE_RECOVERED, device=str(item.device), **unit)
        self.publish_status()

    def _on_camera_degraded(self, item: CameraDegraded) -> None:
        """A missing decoder is an alarm, not a stop (operations.md: optional parts)."""
        self.state.faults = {a for a in self.state.faults if not a.startswith(Alarm.decoder_missing(""))}
        self.state.faults.update(Alarm.decoder_missing(name) for name in item.missing)
        if item.missing:
            log.warning("the camera runs without %s: %s", ", ".join(item.missing), item.detail)
        self.publish_status()

    def lane_weight(self, lane: str, rows: dict[str, dict[str, Any]] | None = None) -> float | None:
        """The lane's weight after the software tare and calibration factor."""
        return self.state.lane_weight(lane, rows if rows is not None else self.ledger.lane_rows())

    # -- platform messages ---------------------------------------------------------------------------
    def _on_inbound(self, msg: Inbound) -> None:
        topic = msg.topic
        if topic == self.topics.ack:
            self._on_ack(msg.payload)
        elif topic == self.topics.cmd:
            self._on_command(msg)
        elif topic in self.topics.catalog_topics:
            if not msg.payload:
                log.info("empty payload on %s (a cleared retained catalog) ignored", topic)
            elif self.ports.catalog is not None:
                self.ports.catalog.submit_bytes(msg.payload, topic)
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
        self.syncer.on_ack(upto, self.clock.monotonic())

    def _acker(self, msg: Inbound) -> Callable[[], None]:
        """Acknowledge ``msg`` on the wire; called once its outcome is committed (mqtt.md v1.1)."""
        acked = False

        def ack() -> None:
            nonlocal acked
            if not acked and self.ports.link is not None and msg.ack is not None:
                acked = True
                self.ports.link.ack(msg)
        return ack

    def _on_command(self, msg: Inbound) -> None:
        ack = self._acker(msg)
        try:
            self._command(msg.payload, ack)
        finally:
            if not any(ack in p.done for p in self.sessions.pending_open.values()):
                ack()

    def _command(self, payload: bytes, ack: Callable[[], None]) -> None:
        try:
            obj = parse_payload(payload)
            cmd = validate(obj, key=self.key, now=self.clock.wall(), skew_s=self.cfg.platform.clock_skew_s,
                           config=self.cfg, seen=self.ledger.command_seen)
        except Rejected as rej:
            if rej.remember_until is not None and rej.command_id is not None:
                self.recorder.remember_command(rej.command_id, rej.remember_until)
            self.reject(rej)
            return
        log.info("command %s %s accepted", cmd.type, cmd.id)
        if cmd.type == "open_door":
            # The id is remembered in the same commit that journals the session: one fsync
            # between the command and the unlock frame.
            try:
                self.sessions.open_door(cmd, ack)
            except Rejected as rej:
                self.recorder.remember_command(cmd.id, self.sessions.seen_until(cmd))
                self.reject(rej)
            return
        if not self.recorder.remember_command(cmd.id, self.sessions.seen_until(cmd)):
            self.reject(Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type))
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

    def _publish_batch(self, payload: bytes) -> int | None:
        if self.ports.link is None:
            return None
        return self.ports.link.publish(self.topics.records, payload, qos=1)

    def _cmd_resend(self, cmd: Command) -> None:
        from_seq = cmd.args["from_seq"]
        self.syncer.rewind(self.clock.monotonic(), from_seq - 1)
        self.reply(cmd.id, True, result={"from_seq": from_seq, "last_seq": self.ledger.last_seq})

    def _cmd_set_lane(self, cmd: Command) -> None:
        lane, code, price = cmd.args["lane"], cmd.args["gtin"], cmd.args["price_cents"]
        look = self.catalog.lookup(code, self.clock.now_dt())
        if not look.certified:
            raise Rejected(f"not_certified: {code} is not certified now ({look.reason})", cmd.id, cmd.type)
        try:
            self.assign_lane(lane, look.gtin, price)
        except RecordFailed:
            raise Rejected("not_allowed: the ledger cannot accept records", cmd.id, cmd.type) from None
        self.recorder.event(EventKind.SET_LANE, lane=lane, gtin=look.gtin, price_cents=price, command_id=cmd.id)
        self.reply(cmd.id, True, result={"lane": lane, "gtin": look.gtin, "price_cents": price})

    def assign_lane(self, lane: str, gtin: str | None, price_cents: int | None) -> None:
        """Put a product (and its price) into a lane; RecordFailed if the ledger refused it."""
        product = self.catalog.product(gtin) if gtin else None
        snapshot = json.dumps(product_dict(product)) if product else None
        with self.recorder.transaction() as tx:
            tx.set_lane(lane, gtin=gtin, price_cents=price_cents, product=snapshot)
        self.view.invalidate()
        self.publish_status()

    # -- camera scans -----------------------------------------------------------------------------------
    def wait_for_scan(self) -> Future[ScanSeen]:
        """The next scan goes to the returned future (``cabinetctl restock`` without --code)."""
        fut: Future[ScanSeen] = Future()
        self.scan_waiters.append(fut)
        return fut

    def _on_scan(self, scan: ScanSeen) -> None:
        consumed = False
        for fut in self.scan_waiters:
            if fut.set_running_or_notify_cancel():   # a timed-out restock cancelled its waiter
                fut.set_result(scan)
                consumed = True
        self.scan_waiters.clear()
        at = self.clock.now_dt()
        active = [m.session for m in self.state.doors.values()
                  if m.session is not None and m.session.phase is Phase.OPEN]
        if scan.gtin is not None:
            for s in active:
                if scan.gtin not in s.scans:
                    s.scans.append(scan.gtin)
                    self.recorder.journal(s.session_id, scans=s.scans)
        context = "session" if active else ("restock" if self.state.service_mode else "idle")
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
            if not self.ledger.idle_report_due(key, self.clock.wall(), IDLE_REPORT_EVERY_S):
                return
        self.recorder.event(EventKind.UNCERTIFIED_SCAN, code=scan.text, gtin=gtin, symbology=scan.symbology,
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
            if self.catalog_rejections.admit(self.clock.monotonic(), self.clock.wall()):
                self.recorder.event(EventKind.CATALOG_REJECTED, version=err.version, reason=err.reason)
            if err.reason == "base_mismatch" and self.ports.link is not None:
                self.ports.link.resubscribe(self.topics.catalog_topics[0])
            return
        res = out.result
        if res.outcome == "same_version":
            return
        self.recorder.event(EventKind.CATALOG_INSTALLED, version=res.version, products=res.products, delta=res.delta)
        self.view.invalidate()
        self.publish_status(force=True)

    # -- status --------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.view.status()

    def publish_status(self, force: bool = False) -> None:
        """Publish on connect, on a change of doors, locks, mode or alarms, and every status_interval_s."""
        link = self.ports.link
        if link is None or not link.connected:
            return
        now = self.clock.monotonic()
        key = self.view.change_key()
        if not self.schedule.due(now, key, force):
            return
        if link.publish(self.topics.status, canonical(self.view.status()), qos=1, retain=True) is not None:
            self.schedule.published(now, key)

    def offline_status(self) -> bytes:
        return self.view.offline_status()

    # -- housekeeping ------------------------------------------------------------------------------------------
    def _housekeeping(self, now: float) -> None:
        wall = self.clock.wall()
        offset = wall - now
        if abs(offset - self._clock_offset) > CLOCK_JUMP_S:
            self.recorder.event(EventKind.CLOCK_JUMP, delta_s=round(offset - self._clock_offset, 3))
        self._clock_offset = offset
        trusted = min(wall, now + self._trusted_offset)
        try:
            with self.recorder.transaction() as tx:
                tx.forget_commands_before(trusted - SEEN_EXTRA_S)
        except RecordFailed:
            pass
        days = self.cfg.platform.retain_synced_days
        cutoff = ts_from_epoch(wall - days * 86400)
        try:
            pruned = self.ledger.prune_synced(cutoff)
            if pruned:
                log.info("pruned %d synced records older than %s days", pruned, days)
        except Exception as exc:  # noqa: BLE001 - sqlite3 errors, disk full
            log.warning("pruning failed: %s", exc)
        self.recorder.recheck()


def open_catalog_cache(path: Path, key: Ed25519PublicKey, timezone: str) -> CatalogStore:
    """The catalog is only a cache of signed documents: one that cannot be opened is moved aside
    (kept for a post-mortem) and rebuilt empty; the retained snapshot refills it."""
    try:
        return CatalogStore(path, key, timezone)
    except (CatalogError, CatalogStoreError, sqlite3.DatabaseError) as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.error("catalog cache %s cannot be used (%s); moved to %s, starting with an empty catalog", path,
                  exc, aside)
        for suffix in ("", "-wal", "-shm"):
            part = path.with_name(path.name + suffix)
            if part.exists():
                os.replace(part, aside.with_name(aside.name + suffix))
        return CatalogStore(path, key, timezone)


def _clip(text: str | None, limit: int = 200) -> str | None:
    """At most ``limit`` characters, an ellipsis included."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit - 3] + "..."
