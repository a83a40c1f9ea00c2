"""The TOML config of operations.md as pydantic models: defaults, bounds, cross-checks.

Every problem is reported as ``key.path: message`` (``lanes[1].door: ...``) so that
``cabinet-agent check-config`` can print one line per problem.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
import zoneinfo
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from agent.errors import ConfigError
from agent.protocol import CABINET_ID_RE, load_public_key

DEFAULT_PATH = "/etc/cabinet-agent/agent.toml"
DEFAULT_DATA_DIR = "/var/lib/cabinet-agent"
DEFAULT_CONTROL_SOCKET = "/run/cabinet-agent/control.sock"
MAX_DAYS = 3650          # retain_synced_days, catalog_max_age_days: beyond this the arithmetic overflows
MAX_BAUDRATE = 4_000_000
FILE_KEYS = ("password_file", "ca_file", "cert_file", "key_file")
# What the daemon keeps in data_dir (control_socket must never name one: operations.md v1.1)
DAEMON_FILES = ("ledger.db", "ledger.db-*", "ledger.hwm", "ledger.hwm.*", "catalog.db", "catalog.db-*",
                "catalog.db.*", "agent.lock", "catalog-upload-*")


class _Section(BaseModel):
    # strict: a TOML ``true`` is not lock channel 1, nor is "1883" a port
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)


class CabinetConfig(_Section):
    id: str = Field(title="cabinet id, part of every MQTT topic")
    data_dir: str = DEFAULT_DATA_DIR
    control_socket: str = DEFAULT_CONTROL_SOCKET
    timezone: str = "UTC"

    @field_validator("data_dir", "control_socket")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if "\0" in v:
            raise ValueError("must not contain a NUL character")
        return v

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


CREDENTIALS_PREFIXES = ("$CREDENTIALS_DIRECTORY/", "${CREDENTIALS_DIRECTORY}/")
"""A file key of [platform] may start with one of these: the file is then a systemd credential
(``LoadCredential=NAME:/path`` in the unit), read from ``$CREDENTIALS_DIRECTORY/NAME``, so the
secret never sits in the config and only the service can read it."""


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
    mqtt_version: Literal["5", "3.1.1"] = Field("5", title="MQTT protocol version (NATS speaks only 3.1.1)")
    max_message_mb: int = Field(64, ge=1, le=256, title="larger messages are dropped (MQTT 5 Maximum Packet Size)")
    connect_timeout_s: float = Field(10, gt=0, le=300, title="bounds the TCP connect, TLS handshake and CONNACK")
    status_interval_s: float = Field(60, gt=0, le=86400)
    ack_timeout_s: float = Field(30, gt=0, le=86400)
    max_batch: int = Field(100, ge=1, le=10000)
    retain_synced_days: float = Field(30, ge=0)
    clock_skew_s: float = Field(300, ge=0, le=86400)
    catalog_max_age_days: float = Field(7, gt=0, title="older catalog raises catalog_stale")
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_spread_s: float = Field(
        20, ge=0, le=600,
        title="after the broker ends an established connection, every reconnect waits uniformly over at least"
              " [0, this]: a fleet that lost its broker together comes back spread out (0: plain backoff)")

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        load_public_key(v)
        return v

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _tls_file(cls, v: str, info: ValidationInfo) -> str:
        # tls is validated first (field order): a CA or a client certificate without TLS would be ignored
        if v and info.data.get("tls") is False:
            raise ValueError("is only used with tls = true")
        if info.field_name == "key_file" and "cert_file" in info.data and bool(v) != bool(info.data["cert_file"]):
            raise ValueError("cert_file and key_file go together (the client certificate for mutual TLS)")
        return v

    @field_validator("password_file")
    @classmethod
    def _password_file(cls, v: str, info: ValidationInfo) -> str:
        if v and info.data.get("username") == "":
            raise ValueError("a password needs a username")
        return v

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20

    def resolve_path(self, key: str) -> Path | None:
        """The file a file key names, with the systemd credentials directory expanded; None if unset.

        ConfigError when the key names a credential but ``$CREDENTIALS_DIRECTORY`` is not set
        (the daemon runs outside the unit, or the unit lacks ``LoadCredential=``).
        """
        value: str = getattr(self, key)
        if not value:
            return None
        for prefix in CREDENTIALS_PREFIXES:
            if value.startswith(prefix):
                base = os.environ.get("CREDENTIALS_DIRECTORY")
                if not base:
                    raise ConfigError([f"platform.{key}: {value} names a systemd credential, but "
                                       "$CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit)"])
                return Path(base) / value[len(prefix):]
        return Path(value)

    def password(self) -> str | None:
        """The password from ``password_file`` (one trailing newline is not part of it), or None."""
        path = self.resolve_path("password_file")
        if path is None:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError([f"platform.password_file: cannot read {path}: {reason}"]) from None
        return text.removesuffix("\n").removesuffix("\r")

    def warnings(self) -> list[str]:
        """What is valid but unsafe (check-config prints these, the daemon logs them)."""
        out = []
        if self.password_file and not self.tls:
            out.append("platform.password_file: the password would be sent in plaintext: set tls = true")
        return out


class LockboardConfig(_Section):
    port: str = "/dev/ttyUSB0"
    baudrate: int = Field(9600, gt=0, le=MAX_BAUDRATE)
    address: int = Field(1, ge=1, le=255)
    feedback_open: int = Field(1, ge=0, le=1)
    latch_release_s: float = Field(0.5, ge=0, le=60)
    reply_timeout_s: float = Field(0.3, gt=0, le=10)
    poll_interval_s: float = Field(0.25, gt=0, le=0.25, title="the board is polled at least every 250 ms")
    fault_after: int = Field(3, ge=1, le=100, title="missed polls in a row before lock_fault")


class ScaleConfig(_Section):
    port: str = "/dev/ttyUSB1"
    baudrate: int = Field(9600, gt=0, le=MAX_BAUDRATE)
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


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = data.get(name, {})
    return section if isinstance(section, dict) else {}


def _platform_checks(data: dict[str, Any]) -> list[str]:
    """[platform] keys the section's own model leaves open: an empty host, day counts so large
    that "now minus that many days" is no date (the daemon's housekeeping would fail forever)."""
    platform = _section(data, "platform")
    problems: list[str] = []
    host = platform.get("host")
    if isinstance(host, str) and not host.strip():
        problems.append("platform.host: must not be empty")
    for key in ("retain_synced_days", "catalog_max_age_days"):
        value = platform.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_DAYS:
            problems.append(f"platform.{key}: must be at most {MAX_DAYS} (days), not {value}")
    return problems


def _is_daemon_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in DAEMON_FILES)


def _socket_checks(data: dict[str, Any]) -> list[str]:
    """control_socket must not name data_dir or a file the daemon keeps there: the control
    server would take the path (and, before v1.1, removed whatever sat there)."""
    cabinet = _section(data, "cabinet")
    data_dir = cabinet.get("data_dir", DEFAULT_DATA_DIR)
    sock = cabinet.get("control_socket", DEFAULT_CONTROL_SOCKET)
    if not isinstance(data_dir, str) or not isinstance(sock, str) or not data_dir.strip() or not sock.strip():
        return []   # reported by the section's model
    if "\0" in data_dir or "\0" in sock:
        return []
    real_dir = os.path.realpath(data_dir)
    real_sock = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(sock))), os.path.basename(sock))
    if real_sock == real_dir or os.path.realpath(sock) == real_dir:
        return [f"cabinet.control_socket: {sock} is data_dir itself"]
    if os.path.dirname(real_sock) == real_dir and _is_daemon_file(os.path.basename(real_sock)):
        return [f"cabinet.control_socket: {sock} is {os.path.basename(real_sock)}, a file the daemon keeps in "
                f"data_dir ({data_dir}); choose another path (default {DEFAULT_CONTROL_SOCKET})"]
    return []


def _cross_checks(data: dict[str, Any]) -> list[str]:
    """Checks across entries, on the raw document so that they are reported together with
    the per-key problems (one line per problem, all of them at once)."""
    problems = _platform_checks(data) + _socket_checks(data)
    return problems + _table_checks(data)


def _table_checks(data: dict[str, Any]) -> list[str]:
    """[[doors]] and [[lanes]]: unique numbers, channels and names; lanes behind defined doors."""
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


def file_problems(cfg: Config) -> list[str]:
    """``check-config`` (v1.1): every file the config names exists and is readable by whoever
    runs the check. Not part of ``load_config``: cabinetctl, run by an operator who may not
    read the daemon's key, loads the same config."""
    problems: list[str] = []
    for key in FILE_KEYS:
        value: str = getattr(cfg.platform, key)
        if not value:
            continue
        if value.startswith(CREDENTIALS_PREFIXES) and not os.environ.get("CREDENTIALS_DIRECTORY"):
            continue   # a systemd credential: only the unit knows where it comes from
        try:
            path = cfg.platform.resolve_path(key)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if path is not None:
            problems += _readable_file(f"platform.{key}", path)
    return problems


def _readable_file(key: str, path: Path) -> list[str]:
    """[] if ``path`` is a file we can open for reading, else the one problem with it."""
    if path.is_dir():
        return [f"{key}: {path} is a directory, not a file"]
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return [f"{key}: {path} does not exist"]
    except OSError as exc:
        return [f"{key}: cannot read {path}: {exc.strerror or exc}"]
    return []


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
