"""Config checks of operations.md v1.1: non-empty paths and host, control_socket not one of
the daemon's files, bounds where a huge value breaks the daemon's arithmetic, the cabinet id's
trailing newline, and (check-config only) that every file the config names can be read."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import MAX_DAYS, file_problems, parse_config
from agent.errors import ConfigError
from agent.protocol import public_key_b64

KEY = public_key_b64(Ed25519PrivateKey.generate())
BASE: dict[str, Any] = {
    "cabinet": {"id": "CAB-0001"},
    "platform": {"public_key": KEY},
    "doors": [{"door": 1, "lock": 1}],
    "lanes": [{"lane": "A1", "door": 1, "channel": 1}],
}


def data_with(**sections: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    found = info.value.problems
    assert found and all("\n" not in p for p in found), found
    return found


def only_problem(data: dict[str, Any], prefix: str) -> str:
    found = problems_of(data)
    assert len(found) == 1 and found[0].startswith(prefix) and len(found[0]) > len(prefix), found
    return found[0]


# -- the cabinet id ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["CAB-0001\n", "CAB 1", "", "x" * 65])
def test_cabinet_id_pattern_is_anchored_at_the_very_end(bad: str) -> None:
    """Regression: ``$`` let "CAB-0001\\n" through, a topic level with a newline in it."""
    only_problem(data_with(cabinet={"id": bad}), "cabinet.id: ")


# -- paths and host that must not be empty ------------------------------------------------------------------
@pytest.mark.parametrize(("section", "key"), [("cabinet", "data_dir"), ("cabinet", "control_socket"),
                                              ("platform", "host")])
@pytest.mark.parametrize("empty", ["", "   "])
def test_paths_and_host_must_not_be_empty(section: str, key: str, empty: str) -> None:
    msg = only_problem(data_with(**{section: {key: empty}}), f"{section}.{key}: ")
    assert "empty" in msg


# -- control_socket is never one of the daemon's own files ------------------------------------------------------
@pytest.mark.parametrize("name", ["ledger.db", "ledger.db-wal", "ledger.db-shm", "ledger.hwm", "ledger.hwm.tmp",
                                  "catalog.db", "catalog.db-wal", "agent.lock", "catalog-upload-1-2.json"])
def test_control_socket_naming_a_daemon_file_in_data_dir_is_refused(tmp_path: Path, name: str) -> None:
    """Regression: control_socket = the ledger's path passed, and the control server then deleted the ledger."""
    data_dir = tmp_path / "data"
    msg = only_problem(data_with(cabinet={"data_dir": str(data_dir), "control_socket": str(data_dir / name)}),
                       "cabinet.control_socket: ")
    assert name in msg


def test_control_socket_check_sees_through_dots_and_symlinks(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (tmp_path / "alias").symlink_to(data_dir)
    for sock in (tmp_path / "alias" / "ledger.db", tmp_path / "other" / ".." / "data" / "ledger.db"):
        only_problem(data_with(cabinet={"data_dir": str(data_dir), "control_socket": str(sock)}),
                     "cabinet.control_socket: ")
    only_problem(data_with(cabinet={"data_dir": str(data_dir), "control_socket": str(data_dir)}),
                 "cabinet.control_socket: ")


def test_control_socket_beside_the_daemon_files_is_fine(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cfg = parse_config(data_with(cabinet={"data_dir": str(data_dir), "control_socket": str(data_dir / "ctl.sock")}))
    assert cfg.cabinet.control_socket == str(data_dir / "ctl.sock")
    # the defaults: /run vs /var/lib
    assert parse_config(copy.deepcopy(BASE)).cabinet.control_socket == "/run/cabinet-agent/control.sock"


# -- bounds where a huge value breaks arithmetic ------------------------------------------------------------------
@pytest.mark.parametrize("key", ["retain_synced_days", "catalog_max_age_days"])
@pytest.mark.parametrize("value", [1e6, math.inf, MAX_DAYS + 1])
def test_day_counts_have_a_sane_upper_bound(key: str, value: float) -> None:
    """Regression: retain_synced_days = 1e6 passed; "now minus 1e6 days" is no date, and the daemon's
    housekeeping (pruning, and the retry of events that waited for the ledger) failed every 10 s."""
    msg = only_problem(data_with(platform={key: value}), f"platform.{key}: ")
    assert str(MAX_DAYS) in msg


@pytest.mark.parametrize("key", ["retain_synced_days", "catalog_max_age_days"])
def test_day_counts_up_to_the_bound_are_accepted(key: str) -> None:
    cfg = parse_config(data_with(platform={key: MAX_DAYS}))
    assert getattr(cfg.platform, key) == MAX_DAYS


@pytest.mark.parametrize("section", ["lockboard", "scale"])
def test_baudrate_has_an_upper_bound(section: str) -> None:
    only_problem(data_with(**{section: {"baudrate": 10**12}}), f"{section}.baudrate: ")
    assert getattr(parse_config(data_with(**{section: {"baudrate": 115200}})), section).baudrate == 115200


def test_several_v11_problems_are_reported_together(tmp_path: Path) -> None:
    data = data_with(cabinet={"id": "CAB\n", "data_dir": str(tmp_path), "control_socket": str(tmp_path / "agent.lock")},
                     platform={"host": "", "retain_synced_days": 1e6})
    found = problems_of(data)
    assert sorted(p.split(":")[0] for p in found) == ["cabinet.control_socket", "cabinet.id", "platform.host",
                                                      "platform.retain_synced_days"], found


# -- files the config names (check-config) ----------------------------------------------------------------------
def test_files_that_exist_and_can_be_read_pass(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem", "password"):
        (tmp_path / name).write_text("x\n")
    cfg = parse_config(data_with(platform={
        "tls": True, "ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "cert.pem"),
        "key_file": str(tmp_path / "key.pem"), "username": "cab", "password_file": str(tmp_path / "password")}))
    assert file_problems(cfg) == []
    assert file_problems(parse_config(copy.deepcopy(BASE))) == []   # no file named: nothing to check


def test_missing_and_directory_files_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x\n")
    cfg = parse_config(data_with(platform={
        "tls": True, "ca_file": str(tmp_path / "nope.pem"), "cert_file": str(tmp_path / "cert.pem"),
        "key_file": str(tmp_path), "username": "cab", "password_file": str(tmp_path / "missing")}))
    found = file_problems(cfg)
    assert len(found) == 3, found
    by_key = {p.split(":")[0]: p for p in found}
    assert set(by_key) == {"platform.ca_file", "platform.key_file", "platform.password_file"}
    assert "does not exist" in by_key["platform.ca_file"] and "nope.pem" in by_key["platform.ca_file"]
    assert "directory" in by_key["platform.key_file"]
    assert "does not exist" in by_key["platform.password_file"]


def test_a_systemd_credential_is_checked_where_systemd_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(data_with(platform={"username": "cab",
                                           "password_file": "$CREDENTIALS_DIRECTORY/mqtt-password"}))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert file_problems(cfg) == []          # outside the unit: nothing to check against
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    found = file_problems(cfg)
    assert len(found) == 1 and found[0].startswith("platform.password_file: "), found
    (tmp_path / "mqtt-password").write_text("secret\n")
    assert file_problems(cfg) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file; tests/e2e/test_e2e_operator_config.py "
                                               "checks an unreadable file as an unprivileged user")
def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x\n")
    key.chmod(0)
    (tmp_path / "cert.pem").write_text("x\n")
    cfg = parse_config(data_with(platform={"tls": True, "cert_file": str(tmp_path / "cert.pem"),
                                           "key_file": str(key)}))
    found = file_problems(cfg)
    assert len(found) == 1 and found[0].startswith("platform.key_file: cannot read"), found
