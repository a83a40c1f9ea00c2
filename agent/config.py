"""The TOML config of operations.md as pydantic models: defaults, bounds, cross-checks.

Every problem is reported as ``key.path: message`` (``lanes[1].door: ...``) so that
``cabinet-agent check-config`` can print one line per problem.
"""

from __future__ import annotations

import os
import re
import tomllib
import zoneinfo
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import ConfigError
from agent.protocol import load_public_key

DEFAULT_PATH = "/etc/cabinet-agent/agent.toml"
CABINET_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _Section(BaseModel):
    # strict: a TOML ``true`` is not lock channel 1, nor is "1883" a port
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)


class CabinetConfig(_Section):
    id: str = Field(title="cabinet id, part of every MQTT topic")
    data_dir: str = "/var/lib/cabinet-agent"
    control_socket: str = "/run/cabinet-agent/control.sock"
    timezone: str = "UTC"

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not CABINET_ID_RE.match(v):
            raise ValueError("must match ^[A-Za-z0-9_-]{1,64}$")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {v!r}") from exc
        return v


class PlatformConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password_file: str = ""
    public_key: str = Field(title="platform Ed25519 public key, base64 of 32 raw bytes")
    status_interval_s: float = Field(60, gt=0, le=86400)
    ack_timeout_s: float = Field(30, gt=0, le=86400)
    max_batch: int = Field(100, ge=1, le=10000)
    retain_synced_days: float = Field(30, ge=0)
    clock_skew_s: float = Field(300, ge=0, le=86400)
    catalog_max_age_days: float = Field(7, gt=0, title="older catalog raises catalog_stale")
    keepalive_s: int = Field(30, ge=5, le=3600)

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        load_public_key(v)
        return v


class LockboardConfig(_Section):
    port: str = "/dev/ttyUSB0"
    baudrate: int = Field(9600, gt=0)
    address: int = Field(1, ge=1, le=255)
    feedback_open: int = Field(1, ge=0, le=1)
    latch_release_s: float = Field(0.5, ge=0, le=60)
    reply_timeout_s: float = Field(0.3, gt=0, le=10)
    poll_interval_s: float = Field(0.25, gt=0, le=0.25, title="the board is polled at least every 250 ms")
    fault_after: int = Field(3, ge=1, le=100, title="missed polls in a row before lock_fault")


class ScaleConfig(_Section):
    port: str = "/dev/ttyUSB1"
    baudrate: int = Field(9600, gt=0)
    settle_s: float = Field(1.5, gt=0, le=60)
    reply_timeout_s: float = Field(0.1, gt=0, le=10)
    fault_after: int = Field(3, ge=1, le=100, title="missed reads in a row before scale_fault")


class CameraConfig(_Section):
    source: str = Field("0", title='V4L2 index or device, video file, image glob; "" disables the camera')
    fps: float = Field(10, gt=0, le=120)


class SessionConfig(_Section):
    open_timeout_s: float = Field(30, gt=0, le=3600)
    door_open_alarm_s: float = Field(120, gt=0, le=86400)


class DoorConfig(_Section):
    door: int = Field(ge=1, le=255)
    lock: int = Field(ge=1, le=24)


class LaneConfig(_Section):
    lane: str = Field(min_length=1, max_length=32)
    door: int = Field(ge=1)
    channel: int = Field(ge=1, le=247)


class Config(_Section):
    cabinet: CabinetConfig
    platform: PlatformConfig
    lockboard: LockboardConfig = LockboardConfig()
    scale: ScaleConfig = ScaleConfig()
    camera: CameraConfig = CameraConfig()
    session: SessionConfig = SessionConfig()
    # operations.md: every key has a default except cabinet.id and platform.public_key; for
    # the tables that is "none configured" (the daemon warns at start)
    doors: list[DoorConfig] = Field(default_factory=list)
    lanes: list[LaneConfig] = Field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return Path(self.cabinet.data_dir)

    def lanes_of_door(self, door: int) -> list[LaneConfig]:
        return [lane for lane in self.lanes if lane.door == door]

    def door(self, door: int) -> DoorConfig | None:
        return next((d for d in self.doors if d.door == door), None)

    def lane(self, name: str) -> LaneConfig | None:
        return next((lane for lane in self.lanes if lane.lane == name), None)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "config"


def _unique(items: list[Any], section: str, field: str, what: str) -> list[str]:
    """One problem per item whose ``field`` repeats an earlier item's."""
    problems: list[str] = []
    first: dict[Any, int] = {}
    for i, item in enumerate(items):
        value = item.get(field) if isinstance(item, dict) else None
        if value is None or not isinstance(value, (int, str)) or isinstance(value, bool):
            continue  # missing or mistyped: pydantic reports it
        if value in first:
            problems.append(f"{section}[{i}].{field}: {what} {value} is already used by {section}[{first[value]}]")
        first.setdefault(value, i)
    return problems


def _cross_checks(data: dict[str, Any]) -> list[str]:
    """Checks across entries, on the raw document so that they are reported together with
    the per-key problems (one line per problem, all of them at once)."""
    doors = data.get("doors", [])
    lanes = data.get("lanes", [])
    if not isinstance(doors, list) or not isinstance(lanes, list):
        return []
    problems = _unique(doors, "doors", "door", "door")
    problems += _unique(doors, "doors", "lock", "lock channel")
    door_numbers = {d.get("door") for d in doors if isinstance(d, dict)}
    # a door without a valid number (pydantic reports it) leaves the lanes' doors undecidable
    check_lane_doors = all(isinstance(n, int) for n in door_numbers)
    for i, lane in enumerate(lanes if check_lane_doors else []):
        if isinstance(lane, dict) and isinstance(lane.get("door"), int) and lane["door"] not in door_numbers:
            problems.append(f"lanes[{i}].door: door {lane['door']} is not defined in [[doors]]")
    problems += _unique(lanes, "lanes", "lane", "lane")
    problems += _unique(lanes, "lanes", "channel", "scale channel")
    return problems


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document; ConfigError lists every problem with its key path."""
    problems: list[str] = []
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            msg = msg.removeprefix("Value error, ")
            problems.append(f"{_loc(err['loc'])}: {msg}")
        raise ConfigError(problems + _cross_checks(data)) from None
    problems = _cross_checks(data)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get("CABINET_AGENT_CONFIG") or DEFAULT_PATH


def load_config(path: str | os.PathLike[str]) -> Config:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"config: cannot read {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"config: {path} is not UTF-8"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config: TOML syntax error: {exc}"]) from None
    return parse_config(data)
