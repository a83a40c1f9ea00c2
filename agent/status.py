"""The cabinet's status (mqtt.md, Status): doors, mode and alarms, and when to publish it.

Runs on the core thread. Cheap parts (doors, faults) are computed at every step to notice a
change at once; the product, catalog and storage alarms change with the catalog, the
planogram or the date and are cached for a few seconds.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.protocol import canonical, epoch_of

if TYPE_CHECKING:
    from agent.core import Core

STORAGE_LOW_BYTES = 50 * 1024 * 1024
SLOW_ALARMS_TTL_S = 5.0


class StatusReporter:
    def __init__(self, core: "Core") -> None:
        self.core = core
        self._slow_alarm_cache: tuple[float, list[str]] | None = None
        self._last_status_key: Any = None
        self._last_status_at = -1e9

    def door_states(self) -> list[dict[str, Any]]:
        now = self.core.clock()
        out = []
        for door, machine in self.core.doors.items():
            raw = self.core.feedback[door]
            if raw is None:
                out.append({"door": door, "open": None, "locked": None})
            elif not raw:
                out.append({"door": door, "open": False, "locked": True})
            else:
                in_pulse = machine.last_pulse_at is not None and now - machine.last_pulse_at <= self.core.timing.ambiguous_s
                out.append({"door": door, "open": not in_pulse and bool(machine.is_open), "locked": False})
        return out

    def alarms(self) -> list[str]:
        alarms = [f"door_left_open:{d}" for d, m in self.core.doors.items() if m.left_open_alarm]
        alarms += sorted(self.core.faults)
        alarms += self._slow_alarms()
        if self.core.alarm_ledger_corrupt:
            alarms.append("ledger_corrupt")
        if not self.core.ledger_ok:
            alarms.append("ledger_unwritable")
        return alarms

    def _slow_alarms(self) -> list[str]:
        """Product, catalog and storage alarms: they change with the catalog, the planogram or
        the date, so they are recomputed every few seconds (or when invalidated), not at every step."""
        now = self.core.clock()
        if self._slow_alarm_cache is not None and now - self._slow_alarm_cache[0] < SLOW_ALARMS_TTL_S:
            return self._slow_alarm_cache[1]
        alarms: list[str] = []
        at = self.core.now_dt()
        for lane, row in sorted(self.core.ledger.lane_rows().items()):
            if row.get("gtin") and lane in self.core.lanes:
                look = self.core.catalog.lookup(row["gtin"], at)
                if look.reason == "revoked":
                    alarms.append(f"revoked_product:{lane}")
                elif look.reason == "expired":
                    alarms.append(f"expired_product:{lane}")
                elif not look.certified:
                    alarms.append(f"uncertified_product:{lane}")
        if self._catalog_stale():
            alarms.append("catalog_stale")
        if self._storage_low():
            alarms.append("storage_low")
        self._slow_alarm_cache = (now, alarms)
        return alarms

    def invalidate(self) -> None:
        self._slow_alarm_cache = None

    def _catalog_stale(self) -> bool:
        issued = self.core.catalog.issued_at
        if not issued:
            return True
        try:
            age = self.core.wall() - epoch_of(issued)
        except ValueError:
            return True
        return age > self.core.cfg.platform.catalog_max_age_days * 86400

    def _storage_low(self) -> bool:
        try:
            return shutil.disk_usage(self.core.cfg.data_dir).free < STORAGE_LOW_BYTES
        except OSError:
            return True

    def mode(self) -> str:
        if self.core.service_mode:
            return "service"
        if any(m.busy for m in self.core.doors.values()):
            return "session"
        if "lock_fault" in self.core.faults or not self.core.ledger_ok:
            return "fault"
        return "ready"

    def status(self) -> dict[str, Any]:
        return {
            "online": True, "at": self.core.now_ts(), "cabinet": self.core.cid, "agent_version": __version__,
            "catalog_version": self.core.catalog.version, "unsynced": self.core.ledger.unsynced,
            "last_seq": self.core.ledger.last_seq, "mode": self.mode(), "doors": self.door_states(),
            "alarms": self.alarms(),
        }

    def publish(self, force: bool = False) -> None:
        """Publish on connect, on a change of doors, locks, mode or alarms, and every status_interval_s."""
        if self.core.link is None or not self.core.link.connected:
            return
        now = self.core.clock()
        key = (self.mode(), tuple(tuple(d.values()) for d in self.door_states()), tuple(self.alarms()),
               self.core.catalog.version)
        due = now - self._last_status_at >= self.core.cfg.platform.status_interval_s
        if not (force or due or key != self._last_status_key):
            return
        if self.core.link.publish(self.core.topic("status"), canonical(self.status()), qos=1, retain=True) is not None:
            self._last_status_key = key
            self._last_status_at = now

    def offline_status(self) -> bytes:
        return canonical({"online": False, "at": self.core.now_ts(), "cabinet": self.core.cid})

