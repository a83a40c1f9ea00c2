"""Helpers of the operator tests (tests/e2e/test_e2e_operator*.py): a simulated cabinet in a
directory an unprivileged user can reach, cabinetctl run as root or as that user, waits.

The unprivileged user is ``nobody`` (group ``nogroup``), which every Linux has: nothing is
added to the machine. The tests run as root (they need to switch users); elsewhere the tests
that need the user are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sim.cabinet import SimulatedCabinet, Timings
from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent.parent
OPERATOR_USER, OPERATOR_GROUP = "nobody", "nogroup"
FAST = Timings.fast()
NO_AUTO_RESEND = dataclasses.replace(FAST, ack_timeout_s=60.0)


@dataclasses.dataclass(frozen=True)
class Unprivileged:
    """How to run a process as the unprivileged user: who, and with which Python."""

    user: str
    group: str
    uid: int
    gid: int
    python: str
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.python, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=self.env, user=self.uid, group=self.gid, extra_groups=[])


def _python_env() -> dict[str, str]:
    """PYTHONPATH for an interpreter that is not this venv's: the project and the venv's packages."""
    paths = {str(ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": os.pathsep.join(sorted(paths))}


def _interpreters() -> Iterator[str]:
    """This venv's Python first; then ones the user may reach when the venv's base interpreter
    lives where it cannot (pyenv under /root)."""
    seen: set[str] = set()
    for candidate in (sys.executable, os.path.realpath(sys.executable), shutil.which("python3") or "",
                      f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", "/usr/bin/python3"):
        if candidate and candidate not in seen and os.path.exists(candidate):
            seen.add(candidate)
            yield candidate


def find_unprivileged() -> Unprivileged:
    """The unprivileged user and a Python of this version it can run the project with; skips otherwise."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test runs cabinetctl as the unprivileged user nobody")
    try:
        uid, gid = pwd.getpwnam(OPERATOR_USER).pw_uid, grp.getgrnam(OPERATOR_GROUP).gr_gid
    except KeyError:
        pytest.skip(f"no user {OPERATOR_USER} / group {OPERATOR_GROUP} on this machine")
    env = _python_env()
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    probe = f"import sys, agent.cli.cabinetctl; assert '%d.%d' % sys.version_info[:2] == {want!r}"
    for python in _interpreters():
        try:
            r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30, cwd=ROOT, env=env,
                               user=uid, group=gid, extra_groups=[])
        except OSError:
            continue
        if r.returncode == 0:
            return Unprivileged(OPERATOR_USER, OPERATOR_GROUP, uid, gid, python, env)
    pytest.skip(f"no Python {want} that user {OPERATOR_USER} can run the project with")


@contextlib.contextmanager
def reachable_dir() -> Iterator[Path]:
    """A fresh directory everyone may enter (pytest's tmp_path sits below a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="cabinet-operator-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_cabinet(workdir: Path, **kw: Any) -> Iterator[SimulatedCabinet]:
    kw.setdefault("timings", FAST)
    kw.setdefault("cabinet_id", "CAB-OP")
    cab = SimulatedCabinet(workdir, **kw)
    try:
        cab.start()
        yield cab
    finally:
        cab.stop()


def data_dir(cab: SimulatedCabinet) -> Path:
    return Path(cab.config()["cabinet"]["data_dir"])


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    return result


def status(cab: SimulatedCabinet) -> dict[str, Any]:
    st: dict[str, Any] = json.loads(ok(cab.ctl("status", "--json")).stdout)
    return st


def barrier(cab: SimulatedCabinet) -> int:
    """The daemon's last seq now, once the platform holds every record up to it."""
    assert cab.platform is not None
    last: int = status(cab)["last_seq"]
    cab.platform.wait_contiguous(last)
    return last


def events(cab: SimulatedCabinet, kind: str) -> list[dict[str, Any]]:
    assert cab.platform is not None
    return cab.platform.events(kind)


def ctl_past_stability(cab: SimulatedCabinet, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """tare/calibrate need a stable weight: retry while (and only while) the daemon says it is not yet."""
    def attempt() -> subprocess.CompletedProcess[str] | None:
        r = cab.ctl(*args)
        return None if r.returncode == 1 and "not stable" in r.stderr else r

    result: subprocess.CompletedProcess[str] = wait_until(attempt, timeout, f"cabinetctl {' '.join(args)} "
                                                                             "past the stability check")
    return result


def share_with_group(directory: Path, group_gid: int) -> None:
    """data_dir as the unit leaves it for an operator in the service's group: the group may
    read and enter, nobody but the owner may write."""
    os.chown(directory, 0, group_gid)
    directory.chmod(0o750)
    for entry in directory.iterdir():
        if entry.is_file() and not entry.is_symlink():
            os.chown(entry, 0, group_gid)
            entry.chmod(0o640)


def snapshot(directory: Path) -> dict[str, tuple[int, float, bytes]]:
    """Every file's size, mtime and content: what "never writes" is checked against."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime, p.read_bytes()) for p in sorted(directory.iterdir())
            if p.is_file()}
