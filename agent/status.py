"""The cabinet's status (mqtt.md, Status): doors, mode and alarms, and when it is worth
publishing. It only computes; the core publishes.

Cheap parts (doors, faults) are computed at every step to notice a change at once; the
product, catalog and storage alarms change with the catalog, the planogram or the date and
are cached for a few seconds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.clock import Clock
from agent.config import Config
from agent.protocol import Alarm, Mode, canonical, epoch_of
from agent.recorder import Recorder
from agent.state import CabinetState
from agent.store.catalog import CatalogStore

STORAGE_LOW_BYTES = 50 * 1024 * 1024
SLOW_ALARMS_TTL_S = 5.0


class StatusView:
    def __init__(self, cfg: Config, state: CabinetState, recorder: Recorder, catalog: CatalogStore, clock: Clock,
                 disk_free: Callable[[], int] | None = None) -> None:
        self.cfg = cfg
        self.state = state
        self.recorder = recorder
        self.catalog = catalog
        self.clock = clock
        self._disk_free = disk_free or (lambda: shutil.disk_usage(cfg.data_dir).free)
        self._slow_alarm_cache: tuple[float, list[str]] | None = None

    def door_states(self) -> list[dict[str, Any]]:
        now = self.clock.monotonic()
        out = []
        for door, machine in self.state.doors.items():
            is_open, locked = machine.reported(now, self.state.feedback[door])
            out.append({"door": door, "open": is_open, "locked": locked})
        return out

    def alarms(self) -> list[str]:
        st = self.state
        alarms = [Alarm.door_left_open(d) for d, m in st.doors.items() if m.left_open_alarm]
        alarms += sorted(st.faults)
        alarms += self._slow_alarms()
        if st.ledger_corrupt:
            alarms.append(Alarm.LEDGER_CORRUPT)
        if not self.recorder.writable:
            alarms.append(Alarm.LEDGER_UNWRITABLE)
        return alarms

    def _slow_alarms(self) -> list[str]:
        """Product, catalog and storage alarms: they change with the catalog, the planogram or
        the date, so they are recomputed every few seconds (or when invalidated), not at every step."""
        now = self.clock.monotonic()
        if self._slow_alarm_cache is not None and now - self._slow_alarm_cache[0] < SLOW_ALARMS_TTL_S:
            return self._slow_alarm_cache[1]
        alarms: list[str] = []
        at = self.clock.now_dt()
        for lane, row in sorted(self.recorder.lane_rows().items()):
            if row.get("gtin") and lane in self.state.lanes:
                look = self.catalog.lookup(row["gtin"], at)
                if look.reason == "revoked":
                    alarms.append(Alarm.revoked_product(lane))
                elif look.reason == "expired":
                    alarms.append(Alarm.expired_product(lane))
                elif not look.certified:
                    alarms.append(Alarm.uncertified_product(lane))
        if self._catalog_stale():
            alarms.append(Alarm.CATALOG_STALE)
        if self.storage_low():
            alarms.append(Alarm.STORAGE_LOW)
        self._slow_alarm_cache = (now, alarms)
        return alarms

    def invalidate(self) -> None:
        self._slow_alarm_cache = None

    def _catalog_stale(self) -> bool:
        issued = self.catalog.issued_at
        if not issued:
            return True
        try:
            age = self.clock.wall() - epoch_of(issued)
        except ValueError:
            return True
        return age > self.cfg.platform.catalog_max_age_days * 86400

    def storage_low(self) -> bool:
        try:
            return self._disk_free() < STORAGE_LOW_BYTES
        except OSError:
            return True

    def mode(self) -> Mode:
        st = self.state
        if st.service_mode:
            return Mode.SERVICE
        if st.busy_doors():
            return Mode.SESSION
        if st.lock_faulted or not self.recorder.writable:
            return Mode.FAULT
        return Mode.READY

    def status(self) -> dict[str, Any]:
        ledger = self.recorder.ledger
        return {
            "online": True, "at": self.clock.now_ts(), "cabinet": self.cfg.cabinet.id, "agent_version": __version__,
            "catalog_version": self.catalog.version, "unsynced": ledger.unsynced,
            "last_seq": ledger.last_seq, "mode": self.mode(), "doors": self.door_states(),
            "alarms": self.alarms(),
        }

    def change_key(self) -> tuple[Any, ...]:
        """What, when it changes, makes the status worth publishing at once."""
        return (self.mode(), tuple(tuple(d.values()) for d in self.door_states()), tuple(self.alarms()),
                self.catalog.version)

    def offline_status(self) -> bytes:
        return offline_status(self.cfg.cabinet.id, self.clock)


def offline_status(cabinet_id: str, clock: Clock) -> bytes:
    """The Last Will and the goodbye on a clean shutdown."""
    return canonical({"online": False, "at": clock.now_ts(), "cabinet": cabinet_id})


class StatusSchedule:
    """When to publish: on connect (forced), on a change of doors, mode or alarms, and every
    ``status_interval_s``."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last_key: Any = None
        self._last_at = -1e9

    def due(self, now: float, key: Any, force: bool = False) -> bool:
        return force or now - self._last_at >= self.interval_s or key != self._last_key

    def published(self, now: float, key: Any) -> None:
        self._last_key = key
        self._last_at = now
