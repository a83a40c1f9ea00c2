"""The operator's commands behind the control socket (operations.md, cabinetctl).

Each handler runs in the control connection's thread; whatever touches the cabinet's state
runs on the core thread through ``core.call``; waiting (for a scan, for an install) happens
here, never on the core thread.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar, cast

from agent.catalog_worker import CatalogWorker
from agent.control import ControlFailure
from agent.core import Core
from agent.errors import AgentError, CatalogError
from agent.events import ScanSeen
from agent.protocol import EventKind, RecordType
from agent.recorder import RecordFailed
from agent.rules.commands import MAX_PRICE_CENTS, is_price_cents

log = logging.getLogger(__name__)

T = TypeVar("T")

SCAN_WAIT_S = 30.0
MAX_SCAN_WAIT_S = 600.0
UNLOCK_CONFIRM_S = 5.0
# operations.md v1.1: a calibration factor this far from the transmitter's own reading is a
# wrong weight, a wrong lane or a typo, not a calibration
MIN_FACTOR, MAX_FACTOR = 0.5, 2.0


class Operator:
    def __init__(self, core: Core, catalog_worker: CatalogWorker | None = None) -> None:
        self.core = core
        self.catalog_worker = catalog_worker

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, cmd: str, args: dict[str, Any], fds: list[int], user: str,
               progress: Callable[[Any], None]) -> Any:
        handlers: dict[str, Callable[..., Any]] = {
            "status": self.status, "lanes": self.lanes, "service": self.service, "unlock": self.unlock,
            "restock": self.restock, "price": self.price, "tare": self.tare, "calibrate": self.calibrate,
            "catalog": self.catalog_info, "catalog_lookup": self.catalog_lookup,
            "catalog_install": self.catalog_install, "sync": self.sync, "sync_progress": self.sync_progress,
        }
        fn = handlers.get(cmd)
        if fn is None:
            raise ControlFailure(f"unknown command {cmd!r}", 2)
        return fn(args=args, fds=fds, user=user, progress=progress)

    def _on_core(self, fn: Callable[[], T]) -> T:
        return cast(T, self.core.call(fn))

    def _write(self, fn: Callable[[Any], None]) -> None:
        """One ledger transaction on the core thread; a refused write is the operator's failure."""
        try:
            with self.core.recorder.transaction() as tx:
                fn(tx)
        except RecordFailed as exc:
            raise ControlFailure(f"the ledger cannot accept records: {exc}") from None

    def _set_lanes(self, kind: EventKind, changes: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
        """Lane settings and the events recording them commit in one transaction: no change
        without its record, no record of a change that did not happen. ``changes``: (lane,
        columns to set, event fields). On the core thread."""
        recorder = self.core.recorder
        if not recorder.writable or recorder.pending:
            recorder.recheck()   # events that waited for the ledger go first, in their order
        if not recorder.writable or recorder.pending:
            raise ControlFailure("the ledger cannot accept records right now; nothing was changed")
        at = self.core.clock.now_ts()

        def write(tx: Any) -> None:
            for lane, columns, fields in changes:
                tx.set_lane(lane, **columns)
                tx.append(RecordType.EVENT, {"kind": kind, "lane": lane, **fields}, at)

        self._write(write)
        log.info("%s recorded for %s", kind, ", ".join(lane for lane, _, _ in changes))

    def _lane_arg(self, args: dict[str, Any]) -> str:
        lane = args.get("lane")
        lanes = self.core.state.lanes
        if not isinstance(lane, str) or lane not in lanes:
            raise ControlFailure(f"unknown lane {lane!r} (lanes: {', '.join(lanes)})", 2)
        return lane

    # -- reads ---------------------------------------------------------------------------------------
    def status(self, **_: Any) -> dict[str, Any]:
        core = self.core

        def build() -> dict[str, Any]:
            st = core.status()
            rows = core.ledger.lane_rows()
            st["broker_connected"] = core.link_connected
            st["lanes"] = [{"lane": name, "gtin": rows.get(name, {}).get("gtin"),
                            "weight_g": core.lane_weight(name, rows)} for name in core.state.lanes]
            st["catalog_issued_at"] = core.catalog.issued_at
            st["acked_upto"] = core.ledger.acked_upto
            st["sessions"] = [{"door": m.door, "session_id": m.session.session_id, "phase": m.session.phase.value}
                              for m in core.state.doors.values() if m.session is not None]
            return st

        return self._on_core(build)

    def lanes(self, **_: Any) -> list[dict[str, Any]]:
        core = self.core

        def build() -> list[dict[str, Any]]:
            rows = core.ledger.lane_rows()
            at = core.clock.now_dt()
            out = []
            for name, view in core.state.lanes.items():
                row = rows.get(name, {})
                gtin = row.get("gtin")
                product = core.catalog.product(gtin) if gtin else None
                snap = row.get("product") or {}
                unit = product.unit_weight_g if product else snap.get("unit_weight_g")
                weight = core.lane_weight(name, rows)
                count = round(weight / unit) if weight is not None and unit else None
                out.append({
                    "lane": name, "door": view.door, "channel": view.channel, "gtin": gtin,
                    "name": product.name if product else snap.get("name"), "price_cents": row.get("price_cents"),
                    "weight_g": weight, "count": max(count, 0) if count is not None else None,
                    "certified": isinstance(gtin, str) and bool(gtin) and core.catalog.lookup(gtin, at).certified,
                })
            return out

        return self._on_core(build)

    # -- service mode ---------------------------------------------------------------------------------
    def service(self, args: dict[str, Any], user: str, **_: Any) -> dict[str, Any]:
        on = args.get("on")
        if not isinstance(on, bool):
            raise ControlFailure("service takes on or off", 2)
        core = self.core

        def apply() -> dict[str, Any]:
            busy = core.state.busy_doors()
            if on and busy:
                raise ControlFailure(f"a shopping session is in progress on door {busy[0]}; try again when it ends")
            if core.state.service_mode != on:
                self._write(lambda tx: tx.set_meta("service_mode", "1" if on else "0"))
                core.state.service_mode = on
                core.recorder.event(EventKind.SERVICE_MODE, on=on, operator=user)
                core.publish_status()
            return {"service": on}

        return self._on_core(apply)

    def _require_service(self) -> None:
        if not self.core.state.service_mode:
            raise ControlFailure("only in service mode (cabinetctl service on)")

    def unlock(self, args: dict[str, Any], user: str, **_: Any) -> dict[str, Any]:
        door = args.get("door")
        core = self.core
        doors = core.state.doors
        if not isinstance(door, int) or door not in doors:
            raise ControlFailure(f"unknown door {door!r} (doors: {', '.join(map(str, doors))})", 2)

        token = f"service-{uuid.uuid4()}"
        done: Future[Any] = Future()

        def apply() -> None:
            self._require_service()
            if core.ports.lockboard is None:
                raise ControlFailure("no lock board")
            if core.state.lock_faulted:
                raise ControlFailure("the lock board is not answering (lock_fault)")
            core.recorder.event(EventKind.SERVICE_UNLOCK, door=door, operator=user)
            doors[door].service_unlock(core.clock.monotonic())
            core.unlock_waiters[token] = done
            core.unlock(door, token)

        self._on_core(apply)
        try:
            result = done.result(timeout=UNLOCK_CONFIRM_S)
        except FutureTimeout:
            raise ControlFailure(
                f"the unlock of door {door} was not confirmed within {UNLOCK_CONFIRM_S:.0f} s") from None
        if not result.ok:
            raise ControlFailure(f"the unlock of door {door} was not confirmed: {result.detail}")
        return {"door": door, "unlocked": True}

    def restock(self, args: dict[str, Any], user: str, progress: Callable[[Any], None], **_: Any) -> dict[str, Any]:
        lane = self._lane_arg(args)
        qty = args.get("qty", 1)
        price = args.get("price")
        code = args.get("code")
        if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
            raise ControlFailure("--qty must be a whole number >= 1", 2)
        if code is not None and not isinstance(code, str):
            raise ControlFailure("--code must be text", 2)
        if price is not None and not is_price_cents(price):
            raise ControlFailure(f"--price must be a whole number of cents from 0 to {MAX_PRICE_CENTS}", 2)
        core = self.core
        wait_s = _scan_wait(args)   # a bad --wait is a usage error also with --code
        self._on_core(self._require_service)
        symbology: str | None = None
        lookup_code: str = code or ""
        if not code:
            scan = self._await_scan(wait_s, progress)
            # the event names the code as read; the lookup uses the GTIN the pipeline extracted
            # (a GS1 QR's text is not a GTIN; a UPC-E's GTIN-14 is no longer UPC-E)
            code, symbology = scan.text, scan.symbology
            lookup_code = scan.gtin or scan.text
            progress({"scanned": code})

        def apply() -> dict[str, Any]:
            self._require_service()
            at = core.clock.now_dt()
            look = core.catalog.lookup(lookup_code, at, None if lookup_code != code else symbology)
            if not look.certified or look.product is None:
                core.recorder.event(EventKind.UNCERTIFIED_SCAN, code=code, gtin=look.gtin, symbology=symbology,
                                  context="restock", reason=look.reason)
                raise ControlFailure(f"{code} is not certified now: {_why(look.reason)}; restock refused")
            row = core.ledger.lane_rows().get(lane, {})
            new_product = row.get("gtin") != look.gtin
            if new_product and price is None:
                raise ControlFailure(f"{look.gtin} is new to lane {lane}: give its price with --price CENTS")
            try:
                core.assign_lane(lane, look.gtin, price if price is not None else row.get("price_cents"))
            except RecordFailed as exc:
                raise ControlFailure(f"the ledger cannot accept records: {exc}") from None
            core.recorder.event(EventKind.RESTOCK, lane=lane, gtin=look.gtin, qty=qty, cert_id=look.product.cert_id,
                              operator=user)
            return {"lane": lane, "gtin": look.gtin, "name": look.product.name, "qty": qty,
                    "price_cents": price if price is not None else row.get("price_cents")}

        return self._on_core(apply)

    def _await_scan(self, wait_s: float, progress: Callable[[Any], None]) -> ScanSeen:
        """The next camera scan; after ``wait_s`` the waiter is withdrawn, so that the next scan
        is judged (and, if uncertified, recorded) as any other instead of going to nobody."""
        progress({"waiting_for_scan": wait_s})
        fut: Future[ScanSeen] = self._on_core(self.core.wait_for_scan)
        try:
            return fut.result(timeout=wait_s)
        except FutureTimeout:
            pass
        scan: ScanSeen | None = self._on_core(lambda: self._withdraw(fut))
        if scan is None:
            raise ControlFailure(f"no product code scanned within {wait_s:g} s")
        return scan

    def _withdraw(self, fut: Future[ScanSeen]) -> ScanSeen | None:
        """On the core thread (so no scan can slip in between): the scan that did arrive, or
        None once the waiter is cancelled and gone from the core's list."""
        if fut.done() and not fut.cancelled():
            return fut.result()
        fut.cancel()
        waiters = self.core.scan_waiters
        if fut in waiters:
            waiters.remove(fut)
        return None

    def price(self, args: dict[str, Any], user: str, **_: Any) -> dict[str, Any]:
        lane = self._lane_arg(args)
        cents = args.get("cents")
        if not is_price_cents(cents):
            raise ControlFailure(f"price must be a whole number of cents from 0 to {MAX_PRICE_CENTS}", 2)
        core = self.core

        def apply() -> dict[str, Any]:
            before = core.ledger.lane_rows().get(lane, {}).get("price_cents")
            self._set_lanes(EventKind.PRICE_SET, [(lane, {"price_cents": cents},
                                                   {"price_cents": cents, "previous_price_cents": before,
                                                    "operator": user})])
            return {"lane": lane, "price_cents": cents}

        return self._on_core(apply)

    def _stable_gross(self, lane: str) -> float:
        view = self.core.state.lanes[lane]
        if self.core.state.doors[view.door].busy:
            raise ControlFailure(f"door {view.door} has a shopping session in progress")
        if view.gross_g is None:
            raise ControlFailure(f"the scale of lane {lane} is not answering")
        if not view.stable:
            raise ControlFailure(f"the weight of lane {lane} is not stable; try again")
        return view.gross_g

    def tare(self, args: dict[str, Any], user: str, **_: Any) -> dict[str, Any]:
        target = args.get("lane")
        core = self.core
        names = list(core.state.lanes) if target == "all" else [self._lane_arg(args)]

        def apply() -> dict[str, Any]:
            gross = {name: self._stable_gross(name) for name in names}
            rows = core.ledger.lane_rows()
            self._set_lanes(EventKind.TARE, [
                (name, {"tare_g": g}, {"tare_g": g, "previous_tare_g": rows.get(name, {}).get("tare_g"),
                                       "operator": user})
                for name, g in gross.items()])
            return {"tared": names}

        return self._on_core(apply)

    def calibrate(self, args: dict[str, Any], user: str, **_: Any) -> dict[str, Any]:
        lane = self._lane_arg(args)
        grams = args.get("grams")
        if not isinstance(grams, (int, float)) or isinstance(grams, bool) or not math.isfinite(grams) or grams <= 0:
            raise ControlFailure("GRAMS must be a positive, finite number", 2)
        core = self.core

        def apply() -> dict[str, Any]:
            gross = self._stable_gross(lane)
            row = core.ledger.lane_rows().get(lane, {})
            raw = gross - (row.get("tare_g") or 0.0)
            if raw <= 0:
                raise ControlFailure(f"lane {lane} reads {raw:.1f} g above its tare: put the known weight on it")
            factor = _calibration_factor(lane, float(grams), raw)
            self._set_lanes(EventKind.CALIBRATE, [(lane, {"factor": factor},
                                                   {"grams": grams, "reading_g": raw, "factor": factor,
                                                    "previous_factor": row.get("factor"), "operator": user})])
            return {"lane": lane, "factor": factor}

        return self._on_core(apply)

    # -- catalog --------------------------------------------------------------------------------------
    def catalog_info(self, **_: Any) -> dict[str, Any]:
        cat = self.core.catalog
        return {"version": cat.version, "issued_at": cat.issued_at, "products": cat.product_count}

    def catalog_lookup(self, args: dict[str, Any], **_: Any) -> dict[str, Any]:
        code = args.get("code")
        if not isinstance(code, str) or not code:
            raise ControlFailure("give a product code", 2)
        at = self.core.clock.now_dt()
        look = self.core.catalog.lookup(code, at)
        p = look.product
        return {"code": code, "gtin": look.gtin, "certified": look.certified, "reason": look.reason,
                "why": None if look.certified else _why(look.reason),
                "product": None if p is None else {
                    "name": p.name, "producer": p.producer, "origin": p.origin, "cert_id": p.cert_id,
                    "valid_from": str(p.valid_from), "valid_until": str(p.valid_until),
                    "unit_weight_g": p.unit_weight_g, "weight_tolerance_g": p.weight_tolerance_g}}

    def catalog_install(self, fds: list[int], progress: Callable[[Any], None], **_: Any) -> dict[str, Any]:
        if len(fds) != 1:
            raise ControlFailure("catalog install needs the file passed along the request", 2)
        worker = self.catalog_worker
        if worker is None:
            raise ControlFailure("the catalog installer is not running")
        last = [-1]

        def report(done: int, total: int) -> None:
            pct = int(done * 100 / total) if total else 100
            if pct != last[0]:
                last[0] = pct
                progress({"done": done, "total": total})

        # Read the operator's file only through the descriptor cabinetctl passed: reopening it
        # by path would check permissions again against the daemon's user. A spool copy in
        # data_dir (the install reads its input twice) is removed afterwards.
        spool = self.core.cfg.data_dir / f"catalog-upload-{os.getpid()}-{threading.get_ident()}.json"
        try:
            with os.fdopen(os.dup(fds[0]), "rb") as src, open(spool, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            result = worker.install_file(str(spool), report)
        except CatalogError as exc:
            raise ControlFailure(f"catalog refused: {exc.reason}: {exc}") from None
        except OSError as exc:
            raise ControlFailure(f"cannot read the catalog file: {exc.strerror or exc}") from None
        finally:
            spool.unlink(missing_ok=True)
        return {"outcome": result.outcome, "version": result.version, "products": result.products,
                "delta": result.delta}

    # -- sync -----------------------------------------------------------------------------------------
    def sync(self, **_: Any) -> dict[str, Any]:
        core = self.core

        def apply() -> dict[str, Any]:
            core.syncer.rewind(core.clock.monotonic())
            return {"unsynced": core.ledger.unsynced, "last_seq": core.ledger.last_seq,
                    "broker_connected": core.link_connected}

        return self._on_core(apply)

    def sync_progress(self, **_: Any) -> dict[str, Any]:
        """What ``sync --wait`` polls. The ack watermark is written to the ledger before the
        answer (the core writes it at most once a second), so that once this says nothing is
        unsynced, an ``export`` reading the file right after agrees."""
        core = self.core

        def apply() -> dict[str, Any]:
            try:
                core.ledger.flush_acked()
            except (sqlite3.Error, OSError, AgentError) as exc:
                core.recorder.failed(exc)
                raise ControlFailure(f"the ledger cannot record the acknowledgements: {exc}") from None
            return {"unsynced": core.ledger.unsynced, "acked_upto": core.ledger.acked_upto,
                    "last_seq": core.ledger.last_seq, "broker_connected": core.link_connected}

        return self._on_core(apply)


def _calibration_factor(lane: str, grams: float, reading_g: float) -> float:
    """``grams / reading_g``; ControlFailure when it is not a plausible correction of the reading."""
    factor = grams / reading_g
    if not MIN_FACTOR <= factor <= MAX_FACTOR:
        raise ControlFailure(
            f"lane {lane} reads {reading_g:.1f} g above its tare, {grams:g} g would mean a factor of {factor:.3g}: "
            f"outside {MIN_FACTOR}-{MAX_FACTOR} of the transmitter's own reading; refused (is the known weight on "
            "this lane, and is GRAMS right?)")
    return factor


def _scan_wait(args: dict[str, Any]) -> float:
    """How long a restock waits for a scan: a finite number of seconds, at most MAX_SCAN_WAIT_S."""
    wait = args.get("wait_s")
    if wait is None:
        return SCAN_WAIT_S
    if (not isinstance(wait, (int, float)) or isinstance(wait, bool) or not math.isfinite(wait)
            or not 0 < wait <= MAX_SCAN_WAIT_S):
        raise ControlFailure(f"--wait must be a number of seconds above 0 and at most {MAX_SCAN_WAIT_S:.0f}", 2)
    return float(wait)


def _why(reason: str | None) -> str:
    return {
        "unknown": "unknown (not in the certified catalog)",
        "revoked": "revoked (its certificate was withdrawn)",
        "not_yet_valid": "not yet valid (its certificate starts later)",
        "expired": "expired (its certificate has ended)",
        "bad_check_digit": "bad check digit (not a valid GTIN)",
    }.get(reason or "", reason or "not certified")
