"""A whole simulated cabinet: private broker, lock board and scale simulators on ptys, the
reference platform, and the real agent as a subprocess.

One harness for the demo, the end-to-end tests and the benchmarks, so that all three
exercise exactly the product: the same config keys, topics and serial bytes an installer
and the platform use.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from agent.errors import AgentError
from agent.platform.refplatform import ReferencePlatform
from agent.sim.broker import PrivateBroker
from drivers.gs1 import with_check_digit
from drivers.lockboard.simulator import LockBoardSimulator
from drivers.scales.simulator import ScaleSimulator

log = logging.getLogger(__name__)


class SimulationError(AgentError):
    """The simulated cabinet did not do what a step expected (a command refused, a door kept shut)."""


def _gtin(ean13_body: str) -> str:
    return "0" + with_check_digit(ean13_body)


DEMO_PRODUCTS: list[dict[str, Any]] = [
    {"gtin": _gtin("690123456001"), "name": "Dried shiitake 250 g", "producer": "Qinling Mushroom Co-op",
     "origin": "Zhashui county, Shaanxi", "cert_id": "PA-2026-000123", "valid_from": "2026-01-01",
     "valid_until": "2027-12-31", "unit_weight_g": 250.0, "weight_tolerance_g": 6.0},
    {"gtin": _gtin("690123456002"), "name": "Wild mountain honey 500 g", "producer": "Dabie Beekeepers",
     "origin": "Jinzhai county, Anhui", "cert_id": "PA-2026-000456", "valid_from": "2026-01-01",
     "valid_until": "2027-12-31", "unit_weight_g": 520.0, "weight_tolerance_g": 10.0},
    {"gtin": _gtin("690123456003"), "name": "Black tea 100 g", "producer": "Wuling Tea Garden",
     "origin": "Guzhang county, Hunan", "cert_id": "PA-2026-000789", "valid_from": "2026-01-01",
     "valid_until": "2027-12-31", "unit_weight_g": 110.0, "weight_tolerance_g": 4.0},
    {"gtin": _gtin("690123456004"), "name": "Red dates 500 g", "producer": "Hotan Date Farmers",
     "origin": "Hotan county, Xinjiang", "cert_id": "PA-2026-001011", "valid_from": "2026-01-01",
     "valid_until": "2027-12-31", "unit_weight_g": 505.0, "weight_tolerance_g": 8.0},
]

TRAY_G = 120.0


@dataclass(frozen=True)
class LaneSpec:
    lane: str
    door: int
    channel: int
    product: int        # index into the products list
    price_cents: int
    stock: int


DEMO_LANES = [
    LaneSpec("A1", 1, 1, 0, 1590, 12),
    LaneSpec("A2", 1, 2, 1, 4800, 8),
    LaneSpec("B1", 2, 3, 2, 2600, 15),
    LaneSpec("B2", 2, 4, 3, 3200, 10),
]


@dataclass(frozen=True)
class Timings:
    latch_release_s: float = 0.5
    settle_s: float = 1.5
    open_timeout_s: float = 30.0
    door_open_alarm_s: float = 120.0
    ack_timeout_s: float = 30.0
    reconnect_spread_s: float = 20.0    # the agent's default: a fleet comes back spread out

    @classmethod
    def fast(cls) -> Timings:
        """Short timings for tests: the same rules, less waiting."""
        return cls(latch_release_s=0.15, settle_s=0.3, open_timeout_s=3.0, door_open_alarm_s=5.0, ack_timeout_s=3.0,
                   reconnect_spread_s=0.5)


class SimulatedCabinet:
    def __init__(self, workdir: Path, *, cabinet_id: str = "CAB-DEMO", timings: Timings | None = None,
                 products: list[dict[str, Any]] | None = None, lanes: list[LaneSpec] | None = None,
                 camera_source: str = "", log_level: str = "info", config_extra: dict[str, Any] | None = None,
                 auto_ack: bool = True, on_unlock: Callable[[int], None] | None = None,
                 ingest_dsn: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cabinet_id = cabinet_id
        self.timings = timings or Timings()
        self.products = products if products is not None else DEMO_PRODUCTS
        self.lane_specs = lanes if lanes is not None else DEMO_LANES
        self.camera_source = camera_source
        self.log_level = log_level
        self.config_extra = config_extra or {}
        self.auto_ack = auto_ack
        self.on_unlock = on_unlock
        self.ingest_dsn = ingest_dsn   # also feed a reference ingest worker (agent.platform.ingest)
        self.ingest: Any = None
        self.config_path = self.workdir / "agent.toml"
        self.agent_log = self.workdir / "agent.log"
        self.broker: PrivateBroker | None = None
        self.lockboard: LockBoardSimulator | None = None
        self.scales: ScaleSimulator | None = None
        self.platform: ReferencePlatform | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.catalog_version = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, *, assign_lanes: bool = True, publish_catalog: bool = True) -> SimulatedCabinet:
        """Start everything; on any failure stop what was started (no broker or agent left behind)."""
        try:
            return self._start(assign_lanes, publish_catalog)
        except BaseException:
            self.stop()
            raise

    def _start(self, assign_lanes: bool, publish_catalog: bool) -> SimulatedCabinet:
        self.broker = PrivateBroker(log_dir=self.workdir)
        if self.ingest_dsn:
            from agent.platform.ingest import BackgroundIngest

            # subscribed before the agent starts, so that it sees every record from seq 1
            self.ingest = BackgroundIngest([self.broker.url], self.ingest_dsn).__enter__()
        self.lockboard = LockBoardSimulator(address=1, latch_release_s=self.timings.latch_release_s,
                                            on_unlock=self.on_unlock)
        self.lockboard.start()
        weights = {ln.channel: TRAY_G + ln.stock * self.products[ln.product]["unit_weight_g"] for ln in self.lane_specs}
        self.scales = ScaleSimulator(weights, decimals=1, seed=7)
        self.scales.start()
        self.platform = ReferencePlatform(self.broker.host, self.broker.port, self.cabinet_id, auto_ack=self.auto_ack)
        self.platform.start()
        self.write_config()
        if publish_catalog:
            self.publish_catalog()
        self.start_agent()
        if publish_catalog:
            self.wait_catalog(self.catalog_version)
        if assign_lanes:
            for ln in self.lane_specs:
                self.command_ok("set_lane", {"lane": ln.lane, "gtin": self.products[ln.product]["gtin"],
                                             "price_cents": ln.price_cents})
        return self

    def config(self) -> dict[str, Any]:
        assert self.broker and self.lockboard and self.scales and self.platform
        t = self.timings
        cfg: dict[str, Any] = {
            "cabinet": {"id": self.cabinet_id, "data_dir": str(self.workdir / "data"),
                        "control_socket": str(self.workdir / "control.sock"), "timezone": "UTC"},
            "platform": {"host": self.broker.host, "port": self.broker.port,
                         "public_key": self.platform.public_key_b64, "ack_timeout_s": t.ack_timeout_s,
                         "status_interval_s": 60, "reconnect_spread_s": t.reconnect_spread_s},
            "lockboard": {"port": self.lockboard.port, "latch_release_s": t.latch_release_s,
                          "poll_interval_s": 0.1},
            "scale": {"port": self.scales.port, "settle_s": t.settle_s},
            "camera": {"source": self.camera_source, "fps": 10},
            "session": {"open_timeout_s": t.open_timeout_s, "door_open_alarm_s": t.door_open_alarm_s},
            "doors": [{"door": d, "lock": d} for d in sorted({ln.door for ln in self.lane_specs})],
            "lanes": [{"lane": ln.lane, "door": ln.door, "channel": ln.channel} for ln in self.lane_specs],
        }
        for section, values in self.config_extra.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        return cfg

    def write_config(self) -> None:
        self.config_path.write_text(tomli_w.dumps(self.config()))

    def publish_catalog(self, products: list[dict[str, Any]] | None = None) -> int:
        assert self.platform
        self.catalog_version += 1
        doc = self.platform.make_catalog(self.catalog_version, products if products is not None else self.products)
        self.platform.publish_catalog(doc, "snapshot")
        return self.catalog_version

    def wait_catalog(self, version: int, timeout: float = 30.0) -> None:
        """Until the agent's status reports catalog ``version`` installed."""
        platform = self.platform
        assert platform
        platform.wait_for(lambda: (platform.status or {}).get("catalog_version") == version, timeout,
                          f"catalog version {version} installed")

    def start_agent(self, wait: bool = True) -> None:
        platform = self.platform
        assert platform
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log_fh = open(self.agent_log, "ab")
        connections = len(platform.statuses)
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config_path), "--log-level", self.log_level],
            stdout=log_fh, stderr=subprocess.STDOUT, env=env,
        )
        log_fh.close()
        if wait:
            platform.wait_for(
                lambda: len(platform.statuses) > connections and (platform.status or {}).get("online") is True,
                30, "agent online")

    def kill_agent(self) -> None:
        if self.agent is not None:
            self.agent.send_signal(signal.SIGKILL)
            self.agent.wait(10)
            self.agent = None

    def stop_agent(self, timeout: float = 15.0) -> int | None:
        if self.agent is None:
            return None
        self.agent.send_signal(signal.SIGTERM)
        try:
            rc = self.agent.wait(timeout)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            rc = self.agent.wait(5)
        self.agent = None
        return rc

    def stop(self) -> None:
        """Stop whatever runs (idempotent); the parts stay readable for post-mortems."""
        self.stop_agent()
        if self.ingest is not None:
            self.ingest.close()
            self.ingest = None
        for part in (self.platform, self.lockboard, self.scales, self.broker):
            if part is not None:
                try:
                    part.stop()
                except Exception:  # noqa: BLE001 - best effort teardown
                    log.exception("stopping %r", part)

    def __enter__(self) -> SimulatedCabinet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- platform helpers ---------------------------------------------------------------------------
    def command_ok(self, type_: str, args: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        assert self.platform
        cid = self.platform.send_command(type_, args)
        reply = self.platform.wait_reply(cid, timeout)
        if not reply.get("ok"):
            raise SimulationError(f"{type_} {args} refused: {reply.get('error')}")
        return reply

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``cabinetctl`` against this cabinet's agent."""
        return subprocess.run([sys.executable, "-m", "agent.cli.cabinetctl", "--config", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=timeout)

    # -- the shopper ------------------------------------------------------------------------------------
    def lane(self, name: str) -> LaneSpec:
        return next(ln for ln in self.lane_specs if ln.lane == name)

    def unit_g(self, lane: str) -> float:
        return float(self.products[self.lane(lane).product]["unit_weight_g"])

    def take(self, lane: str, qty: int, extra_g: float = 0.0) -> None:
        assert self.scales
        self.scales.add_weight(self.lane(lane).channel, -qty * self.unit_g(lane) + extra_g)

    def authorize(self, door: int, shopper: str, auth: str = "face", session_id: str | None = None) -> str:
        """Send open_door and wait for the agent's ok; returns the session id."""
        sid = session_id or str(uuid.uuid4())
        self.command_ok("open_door", {"door": door, "session_id": sid, "shopper": shopper, "auth": auth})
        return sid

    def wait_door_seen_open(self, door: int, timeout: float = 10.0) -> None:
        platform = self.platform
        assert platform
        platform.wait_for(
            lambda: any(d.get("door") == door and d.get("open") is True
                        for d in (platform.status or {}).get("doors", [])),
            timeout, f"door {door} reported open")

    def shop(self, door: int, takes: dict[str, int], shopper: str = "shopper-1", auth: str = "face",
             wait_sale: bool = True) -> str:
        """One whole session: authorize, open, take, shut; returns the session id."""
        assert self.lockboard and self.platform
        sid = self.authorize(door, shopper, auth)
        if not self.lockboard.open_door(door):
            raise SimulationError(f"door {door} was not released after the unlock")
        self.wait_door_seen_open(door)
        for lane, qty in takes.items():
            self.take(lane, qty)
        self.lockboard.close_door(door)
        if wait_sale:
            self.wait_session_end(sid)
        return sid

    def wait_session_end(self, session_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """The record that ended the session (sale, session_empty or session_timeout), as received."""
        platform = self.platform
        assert platform
        found: list[dict[str, Any]] = []

        def ended() -> bool:
            for rec in platform.records.values():
                body = rec["body"]
                if body.get("session_id") == session_id and (
                        rec["type"] == "sale" or body.get("kind") in ("session_empty", "session_timeout")):
                    found.append(rec)
                    return True
            return False

        platform.wait_for(ended, timeout, f"end of session {session_id}")
        return found[0]
