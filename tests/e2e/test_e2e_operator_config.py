"""``cabinet-agent check-config`` (operations.md v1.1) and what the daemon does with the path of
its control socket, through the real commands.

Issue 8 regressions: the control server removed any file at ``control_socket`` (set it to the
ledger's path and the ledger was gone, and check-config accepted that config); check-config did
not look at the files a config names, accepted empty paths and a host "", and day counts that
break the daemon's date arithmetic.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from operator_support import FAST, ROOT, Unprivileged, data_dir, find_unprivileged, make_cabinet, ok, reachable_dir

from agent.protocol import public_key_b64
from agent.sim.cabinet import SimulatedCabinet

pytestmark = pytest.mark.timeout(60)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def write_config(path: Path, cabinet: dict[str, Any] | None = None, platform: dict[str, Any] | None = None) -> Path:
    doc = {"cabinet": {"id": "CAB-OP", "data_dir": str(path.parent / "data"),
                       "control_socket": str(path.parent / "control.sock"), **(cabinet or {})},
           "platform": {"public_key": public_key_b64(Ed25519PrivateKey.generate()), **(platform or {})},
           "doors": [{"door": 1, "lock": 1}], "lanes": [{"lane": "A1", "door": 1, "channel": 1}]}
    path.write_text(tomli_w.dumps(doc))
    return path


def problem_keys(stderr: str) -> list[str]:
    return sorted(line.split(":", 1)[0] for line in stderr.splitlines())


# -- check-config ---------------------------------------------------------------------------------------------
def test_check_config_reports_each_v11_problem_on_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "agent.toml",
                       cabinet={"control_socket": str(tmp_path / "data" / "ledger.db")},
                       platform={"host": "", "retain_synced_days": 1e6, "tls": True,
                                 "ca_file": str(tmp_path / "missing-ca.pem"), "username": "cab",
                                 "password_file": str(tmp_path / "missing-password")})
    r = check_config(cfg)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert problem_keys(r.stderr) == ["cabinet.control_socket", "platform.host", "platform.retain_synced_days"], \
        r.stderr
    # once those are fixed, the files are looked at
    cfg = write_config(tmp_path / "agent.toml", platform={"tls": True, "ca_file": str(tmp_path / "missing-ca.pem"),
                                                          "username": "cab",
                                                          "password_file": str(tmp_path / "missing-password")})
    r = check_config(cfg)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert problem_keys(r.stderr) == ["platform.ca_file", "platform.password_file"], r.stderr
    assert "missing-ca.pem does not exist" in r.stderr
    (tmp_path / "missing-ca.pem").write_text("x\n")
    (tmp_path / "missing-password").write_text("secret\n")
    r = check_config(cfg)
    assert r.returncode == 0, r.stderr


def test_check_config_reports_a_file_the_user_cannot_read() -> None:
    user = find_unprivileged()
    with reachable_dir() as workdir:
        for name in ("ca.pem", "cert.pem"):
            (workdir / name).write_text("x\n")
            (workdir / name).chmod(0o644)
        key = workdir / "key.pem"
        key.write_text("secret\n")
        key.chmod(0o600)                      # root's, as a key should be
        cfg = write_config(workdir / "agent.toml", platform={
            "tls": True, "ca_file": str(workdir / "ca.pem"), "cert_file": str(workdir / "cert.pem"),
            "key_file": str(key)})
        cfg.chmod(0o644)
        assert check_config(cfg).returncode == 0           # root can read it
        r = _check_config_as(user, cfg)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.splitlines() == [f"platform.key_file: cannot read {key}: Permission denied"], r.stderr


def _check_config_as(user: Unprivileged, cfg: Path) -> subprocess.CompletedProcess[str]:
    return user.run("-m", "agent", "check-config", "--config", str(cfg))


# -- the control socket's path -----------------------------------------------------------------------------------------
@pytest.fixture
def cabinet(tmp_path: Path) -> Iterator[SimulatedCabinet]:
    yield from make_cabinet(tmp_path / "cab", timings=FAST)


def _start_with_socket_at(cab: SimulatedCabinet, path: Path) -> tuple[int, str]:
    """Start the daemon with control_socket = ``path``; (exit code, what it printed) once it ended."""
    cab.config_extra.setdefault("cabinet", {})["control_socket"] = str(path)
    cab.write_config()
    offset = cab.agent_log.stat().st_size
    cab.start_agent(wait=False)
    assert cab.agent is not None
    rc = cab.agent.wait(20)
    cab.agent = None
    with open(cab.agent_log, "rb") as fh:
        fh.seek(offset)
        return rc, fh.read().decode("utf-8", "replace")


def test_daemon_never_removes_what_is_not_a_socket_at_control_socket(cabinet: SimulatedCabinet,
                                                                       tmp_path: Path) -> None:
    """Regression: the control server unlinked whatever sat at control_socket before binding."""
    cab = cabinet
    assert cab.stop_agent() == 0
    precious = tmp_path / "precious.txt"
    precious.write_text("do not delete\n")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    for path, kind in ((precious, "a regular file"), (link, "a symbolic link")):
        rc, out = _start_with_socket_at(cab, path)
        assert rc == 1, out
        assert "Traceback" not in out
        said = [ln for ln in out.splitlines() if ln.startswith("cabinet-agent: ")]
        assert len(said) == 1 and f"{path} is {kind}, not a socket" in said[0], out
        assert precious.read_text() == "do not delete\n"
    assert link.is_symlink()

    # a stale socket (a daemon that died) is removed and replaced
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
    cab.config_extra["cabinet"]["control_socket"] = str(stale)
    cab.write_config()
    cab.start_agent()
    ok(cab.ctl("status"))


def test_control_socket_at_the_ledgers_path_is_a_config_error_and_the_ledger_survives(
        cabinet: SimulatedCabinet) -> None:
    """Regression: control_socket = {data_dir}/ledger.db passed check-config, and the daemon's control
    server then deleted the ledger."""
    cab = cabinet
    ok(cab.ctl("service", "on"))
    assert cab.stop_agent() == 0
    verified = ok(cab.ctl("verify")).stdout
    ledger = data_dir(cab) / "ledger.db"
    content = ledger.read_bytes()

    cab.config_extra.setdefault("cabinet", {})["control_socket"] = str(ledger)
    cab.write_config()
    r = check_config(cab.config_path)
    assert r.returncode == 2 and r.stderr.startswith("cabinet.control_socket: "), (r.returncode, r.stderr)
    rc, out = _start_with_socket_at(cab, ledger)
    assert rc == 2, out
    assert "cabinet.control_socket: " in out and "Traceback" not in out
    assert ledger.read_bytes() == content
    del cab.config_extra["cabinet"]["control_socket"]   # (cabinetctl refuses that config too)
    cab.write_config()
    assert ok(cab.ctl("verify")).stdout == verified
