"""The TOML config of operations.md: defaults, and one `key.path: message` line per problem."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import Config, load_config, parse_config
from agent.errors import ConfigError
from agent.protocol import public_key_b64

KEY = public_key_b64(Ed25519PrivateKey.generate())

# operations.md "Config file (TOML)", verbatim but for a real key
EXAMPLE = """\
[cabinet]
id = "CAB-0001"                      # required
data_dir = "/var/lib/cabinet-agent"  # ledger.db, catalog, state
control_socket = "/run/cabinet-agent/control.sock"
timezone = "UTC"                     # IANA name; certificate dates are local dates

[platform]
host = "127.0.0.1"
port = 1883
tls = false                # true: TLS; ca_file, cert_file, key_file for mTLS
username = ""              # optional
password_file = ""         # optional, file holding the password
public_key = "BASE64"      # required: platform Ed25519 public key (32 raw bytes, base64)
status_interval_s = 60
ack_timeout_s = 30
max_batch = 100
retain_synced_days = 30
clock_skew_s = 300

[lockboard]
port = "/dev/ttyUSB0"      # any pyserial URL also works: loop://, socket://host:port, rfc2217://
baudrate = 9600
address = 1                # board address on the RS-485 bus
feedback_open = 1          # 1: a set bit / S=11 means open; 0: the other way round
latch_release_s = 0.5      # how long an unlock pulse releases the latch

[scale]
port = "/dev/ttyUSB1"
baudrate = 9600
settle_s = 1.5             # how long weights must be stable after the door closes

[camera]
source = "0"               # a V4L2 index or device path, a video file, or a glob of image files
fps = 10

[session]
open_timeout_s = 30        # authorized but the door never opened: relock, record session_timeout
door_open_alarm_s = 120    # door open longer than this: door_left_open alarm

[[doors]]
door = 1
lock = 1                   # lock channel on the lock board

[[lanes]]
lane = "A1"
door = 1
channel = 1                # the lane's weighing transmitter: its Modbus slave address
""".replace('"BASE64"', f'"{KEY}"')

MINIMAL = f"""\
[cabinet]
id = "CAB-0001"

[platform]
public_key = "{KEY}"

[[doors]]
door = 1
lock = 1
"""


def base() -> dict[str, Any]:
    return {
        "cabinet": {"id": "CAB-0001"},
        "platform": {"public_key": KEY},
        "doors": [{"door": 1, "lock": 1}, {"door": 2, "lock": 2}],
        "lanes": [{"lane": "A1", "door": 1, "channel": 1}, {"lane": "B1", "door": 2, "channel": 2}],
    }


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.problems, "ConfigError without problems"
    return info.value.problems


def assert_spec_defaults(cfg: Config) -> None:
    assert cfg.cabinet.id == "CAB-0001"
    assert cfg.cabinet.data_dir == "/var/lib/cabinet-agent"
    assert cfg.data_dir == Path("/var/lib/cabinet-agent")
    assert cfg.cabinet.control_socket == "/run/cabinet-agent/control.sock"
    assert cfg.cabinet.timezone == "UTC"
    p = cfg.platform
    assert p.host == "127.0.0.1"
    assert p.port == 1883
    assert p.tls is False
    assert p.username == "" and p.password_file == ""
    assert p.public_key == KEY
    assert p.status_interval_s == 60
    assert p.ack_timeout_s == 30
    assert p.max_batch == 100
    assert p.retain_synced_days == 30
    assert p.clock_skew_s == 300
    lb = cfg.lockboard
    assert lb.port == "/dev/ttyUSB0"
    assert lb.baudrate == 9600
    assert lb.address == 1
    assert lb.feedback_open == 1
    assert lb.latch_release_s == 0.5
    assert cfg.scale.port == "/dev/ttyUSB1"
    assert cfg.scale.baudrate == 9600
    assert cfg.scale.settle_s == 1.5
    assert cfg.camera.source == "0"
    assert cfg.camera.fps == 10
    assert cfg.session.open_timeout_s == 30
    assert cfg.session.door_open_alarm_s == 120


# -- the documented example and the defaults -------------------------------------------------------------
def test_example_from_operations_md_parses(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(EXAMPLE)
    cfg = load_config(path)
    assert_spec_defaults(cfg)
    assert [(d.door, d.lock) for d in cfg.doors] == [(1, 1)]
    assert [(lane.lane, lane.door, lane.channel) for lane in cfg.lanes] == [("A1", 1, 1)]
    assert cfg.lanes_of_door(1) == cfg.lanes and cfg.lanes_of_door(2) == []
    assert cfg.door(1) is cfg.doors[0] and cfg.door(2) is None
    assert cfg.lane("A1") is cfg.lanes[0] and cfg.lane("B1") is None


def test_minimal_config_has_every_default_as_specified(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL)
    cfg = load_config(path)
    assert_spec_defaults(cfg)
    assert cfg.lanes == []


def test_example_and_minimal_are_equal() -> None:
    full = parse_config(tomllib.loads(EXAMPLE))
    minimal = parse_config(tomllib.loads(MINIMAL + '[[lanes]]\nlane = "A1"\ndoor = 1\nchannel = 1\n'))
    assert full == minimal


def test_non_default_values_are_kept() -> None:
    data = base()
    data["platform"].update(port=8883, tls=True, max_batch=7, clock_skew_s=12.5)
    data["lockboard"] = {"feedback_open": 0, "latch_release_s": 1.25, "address": 255}
    data["cabinet"]["timezone"] = "Asia/Shanghai"
    cfg = parse_config(data)
    assert (cfg.platform.port, cfg.platform.tls, cfg.platform.max_batch, cfg.platform.clock_skew_s) == (
        8883, True, 7, 12.5)
    assert (cfg.lockboard.feedback_open, cfg.lockboard.latch_release_s, cfg.lockboard.address) == (0, 1.25, 255)
    assert cfg.cabinet.timezone == "Asia/Shanghai"


# -- one line per problem, starting with the key path -------------------------------------------------------
def _set(data: dict[str, Any], path: tuple, value: Any) -> None:
    target: Any = data
    for part in path[:-1]:
        target = target.setdefault(part, {}) if isinstance(part, str) else target[part]
    target[path[-1]] = value


_DELETE = object()

CASES: list[tuple[str, tuple, Any, str]] = [
    # unknown keys
    ("unknown top-level key", ("colour",), "red", "colour: "),
    ("unknown section key", ("cabinet", "colour"), "red", "cabinet.colour: "),
    ("unknown platform key", ("platform", "pasword_file"), "x", "platform.pasword_file: "),
    ("unknown door key", ("doors", 1, "relay"), 3, "doors[1].relay: "),
    ("unknown lane key", ("lanes", 1, "weight"), 3, "lanes[1].weight: "),
    # required keys
    ("missing cabinet.id", ("cabinet", "id"), _DELETE, "cabinet.id: "),
    ("missing platform.public_key", ("platform", "public_key"), _DELETE, "platform.public_key: "),
    ("missing door number", ("doors", 0, "door"), _DELETE, "doors[0].door: "),
    ("missing lane channel", ("lanes", 1, "channel"), _DELETE, "lanes[1].channel: "),
    # bad values of required keys
    ("cabinet id pattern", ("cabinet", "id"), "CAB 0001", "cabinet.id: "),
    ("cabinet id too long", ("cabinet", "id"), "C" * 65, "cabinet.id: "),
    ("cabinet id type", ("cabinet", "id"), 123, "cabinet.id: "),
    ("public key not base64", ("platform", "public_key"), "not base64!", "platform.public_key: "),
    ("public key wrong length", ("platform", "public_key"), "AAAA", "platform.public_key: "),
    ("unknown time zone", ("cabinet", "timezone"), "Mars/Olympus_Mons", "cabinet.timezone: "),
    # bad types
    ("port string", ("platform", "port"), "mqtt", "platform.port: "),
    ("tls string", ("platform", "tls"), "maybe", "platform.tls: "),
    ("max_batch fraction", ("platform", "max_batch"), 1.5, "platform.max_batch: "),
    ("latch_release_s string", ("lockboard", "latch_release_s"), "fast", "lockboard.latch_release_s: "),
    ("camera source list", ("camera", "source"), [0], "camera.source: "),
    ("door lock string", ("doors", 1, "lock"), "two", "doors[1].lock: "),
    ("lane name number", ("lanes", 0, "lane"), 7, "lanes[0].lane: "),
    ("section not a table", ("session",), 30, "session: "),
    ("lanes not a list", ("lanes",), {"lane": "A1"}, "lanes: "),
    # out of range
    ("port 0", ("platform", "port"), 0, "platform.port: "),
    ("port 65536", ("platform", "port"), 65536, "platform.port: "),
    ("max_batch 0", ("platform", "max_batch"), 0, "platform.max_batch: "),
    ("ack_timeout_s 0", ("platform", "ack_timeout_s"), 0, "platform.ack_timeout_s: "),
    ("clock_skew_s negative", ("platform", "clock_skew_s"), -1, "platform.clock_skew_s: "),
    ("address 0", ("lockboard", "address"), 0, "lockboard.address: "),
    ("address 256", ("lockboard", "address"), 256, "lockboard.address: "),
    ("feedback_open 2", ("lockboard", "feedback_open"), 2, "lockboard.feedback_open: "),
    ("latch_release_s negative", ("lockboard", "latch_release_s"), -0.5, "lockboard.latch_release_s: "),
    ("baudrate 0", ("scale", "baudrate"), 0, "scale.baudrate: "),
    ("settle_s 0", ("scale", "settle_s"), 0, "scale.settle_s: "),
    ("fps 0", ("camera", "fps"), 0, "camera.fps: "),
    ("open_timeout_s 0", ("session", "open_timeout_s"), 0, "session.open_timeout_s: "),
    ("door_open_alarm_s negative", ("session", "door_open_alarm_s"), -1, "session.door_open_alarm_s: "),
    ("door 0", ("doors", 1, "door"), 0, "doors[1].door: "),
    ("lock 25", ("doors", 1, "lock"), 25, "doors[1].lock: "),
    ("lock 0", ("doors", 0, "lock"), 0, "doors[0].lock: "),
    ("channel 248", ("lanes", 1, "channel"), 248, "lanes[1].channel: "),
    ("channel 0", ("lanes", 0, "channel"), 0, "lanes[0].channel: "),
    ("empty lane name", ("lanes", 1, "lane"), "", "lanes[1].lane: "),
    # cross-checks
    ("lane's door missing", ("lanes", 1, "door"), 9, "lanes[1].door: "),
    ("duplicate lock channel", ("doors", 1, "lock"), 1, "doors[1].lock: "),
    ("duplicate scale channel", ("lanes", 1, "channel"), 1, "lanes[1].channel: "),
    ("duplicate lane name", ("lanes", 1, "lane"), "A1", "lanes[1].lane: "),
    ("duplicate door number", ("doors", 1, "door"), 1, "doors[1].door: "),
]


@pytest.mark.parametrize(("path", "value", "prefix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_problem_is_one_line_starting_with_its_key_path(path: tuple, value: Any, prefix: str) -> None:
    data = base()
    if value is _DELETE:
        target: Any = data
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]
    else:
        _set(data, path, value)
    found = problems(data)
    matching = [p for p in found if p.startswith(prefix)]
    assert len(matching) == 1, found
    assert len(matching[0]) > len(prefix), "the problem says what is wrong"
    assert "\n" not in matching[0]
    if prefix not in ("doors[1].door: ",):  # a duplicate door also makes its lanes ambiguous
        assert found == matching, found


def test_messages_for_unknown_and_missing_keys() -> None:
    data = base()
    data["cabinet"]["colour"] = "red"
    del data["platform"]["public_key"]
    assert sorted(problems(data)) == ["cabinet.colour: unknown key", "platform.public_key: required key is missing"]


def test_missing_sections() -> None:
    data = base()
    del data["cabinet"]
    del data["platform"]
    found = problems(data)
    assert sorted(p.split(":")[0] for p in found) == ["cabinet", "platform"]


def test_several_problems_reported_together() -> None:
    data = base()
    data["platform"]["port"] = 0
    data["lockboard"] = {"address": 300, "feedback_open": 5}
    data["lanes"][1]["channel"] = 999
    found = problems(data)
    assert sorted(p.split(": ")[0] for p in found) == [
        "lanes[1].channel", "lockboard.address", "lockboard.feedback_open", "platform.port"]


def test_cross_check_messages_name_both_places() -> None:
    data = base()
    data["doors"][1]["lock"] = 1
    data["lanes"][1]["channel"] = 1
    data["lanes"].append({"lane": "A1", "door": 7, "channel": 3})
    found = problems(data)
    assert "doors[1].lock: lock channel 1 is already used by doors[0]" in found
    assert "lanes[1].channel: scale channel 1 is already used by lanes[0]" in found
    assert any(p.startswith("lanes[2].lane: ") and "lanes[0]" in p for p in found)
    assert any(p.startswith("lanes[2].door: ") and "7" in p for p in found)
    assert len(found) == 4


def test_a_lane_may_share_a_door_with_others() -> None:
    data = base()
    data["lanes"].append({"lane": "A2", "door": 1, "channel": 3})
    cfg = parse_config(data)
    assert [lane.lane for lane in cfg.lanes_of_door(1)] == ["A1", "A2"]


@pytest.mark.parametrize(
    ("path", "value", "prefix"),
    [
        (("doors", 0, "lock"), True, "doors[0].lock: "),
        (("lockboard", "feedback_open"), True, "lockboard.feedback_open: "),
        (("platform", "tls"), 1, "platform.tls: "),
        (("platform", "port"), "1883", "platform.port: "),
    ],
)
def test_wrongly_typed_values_are_not_coerced(path: tuple, value: Any, prefix: str) -> None:
    data = base()
    _set(data, path, value)
    found = problems(data)
    assert [p for p in found if p.startswith(prefix)]


# -- files ---------------------------------------------------------------------------------------------
def test_toml_syntax_error_is_one_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[cabinet]\nid = "CAB-0001\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert problem.startswith("config: ") and "TOML" in problem
    assert "line 2" in problem


def test_missing_file_is_one_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "agent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("config: ")
    assert str(path) in info.value.problems[0]


def test_unreadable_path_is_one_clear_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a directory
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("config: ") and str(tmp_path) in info.value.problems[0]


def test_non_utf8_file_is_one_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[cabinet]\nid = "CAB-\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("config: ") and "UTF-8" in info.value.problems[0]


def test_problems_from_a_file_carry_key_paths(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(EXAMPLE.replace("lock = 1 ", "lock = 30 ").replace("[[lanes]]\nlane = \"A1\"\ndoor = 1",
                                                                       "[[lanes]]\nlane = \"A1\"\ndoor = 1\nwidth = 3"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert sorted(p.split(": ")[0] for p in info.value.problems) == ["doors[0].lock", "lanes[0].width"]
    assert str(info.value) == "; ".join(info.value.problems)


def test_config_error_does_not_mutate_input() -> None:
    data = base()
    data["platform"]["port"] = 0
    before = copy.deepcopy(data)
    problems(data)
    assert data == before
