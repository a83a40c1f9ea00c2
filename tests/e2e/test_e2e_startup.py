"""Start-up and lifecycle through the real daemon (operations.md v1.1, `cabinet-agent run`):
a start that cannot complete says why in one line, exits 1 and records nothing; SIGTERM at
any moment of the start exits 0; a corrupt catalog cache is rebuilt; systemd's notify
protocol (READY, WATCHDOG fed by a healthy core loop only, STOPPING).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.sim.cabinet import SimulatedCabinet, Timings
from helpers import wait_until


@pytest.fixture
def cabinet_id() -> str:
    return "CAB-START"


def _bare(tmp_path: Path, **kw: Any) -> SimulatedCabinet:
    """A cabinet whose parts run but whose agent is not started yet."""
    cab = SimulatedCabinet(tmp_path / "cab", cabinet_id="CAB-START", timings=Timings.fast(), **kw)
    cab.start_agent = lambda wait=True: None   # type: ignore[method-assign]   # started by the test
    cab.start(assign_lanes=False, publish_catalog=False)
    return cab


def _run(cab: SimulatedCabinet, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cab.config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})), **kw)


def _records(cab: SimulatedCabinet) -> list[tuple[int, str]]:
    db = cab.workdir / "data" / "ledger.db"
    if not db.exists():
        return []
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:
        return [(seq, body) for seq, body in conn.execute("SELECT seq, body FROM records ORDER BY seq")]


def _assert_one_line_failure(proc: subprocess.Popen[str], *, expect: str) -> None:
    out, err = proc.communicate(timeout=30)
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln
             and " ERROR " not in ln]
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("cabinet-agent: ") and expect in lines[0], err


def test_a_missing_password_file_is_one_line_exit_1_and_no_record(tmp_path: Path) -> None:
    cab = _bare(tmp_path, config_extra={"platform": {"username": "cab", "password_file": str(tmp_path / "nope")}})
    try:
        cab.write_config()
        _assert_one_line_failure(_run(cab), expect="nope")
        assert _records(cab) == []       # mqtt.md v1.1: a start that fails records nothing
    finally:
        cab.stop()


def test_a_ledger_of_another_schema_is_one_line_exit_1_and_left_as_it_is(tmp_path: Path) -> None:
    cab = _bare(tmp_path)
    try:
        data = cab.workdir / "data"
        data.mkdir(parents=True)
        with sqlite3.connect(data / "ledger.db") as conn:
            conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
            conn.execute("INSERT INTO invoices VALUES (1, 9.5)")
        before = (data / "ledger.db").read_bytes()
        _assert_one_line_failure(_run(cab), expect="ledger")
        assert (data / "ledger.db").read_bytes() == before
    finally:
        cab.stop()


def test_a_corrupt_catalog_cache_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    cab = _bare(tmp_path)
    try:
        data = cab.workdir / "data"
        data.mkdir(parents=True)
        (data / "catalog.db").write_bytes(b"this is not a database" * 100)
        proc = _run(cab)
        assert cab.platform is not None
        cab.platform.wait_for(lambda: bool(cab.platform and cab.platform.status
                                           and cab.platform.status.get("online")), 30, "agent online")
        assert list(data.glob("catalog.db.corrupt-*")), sorted(p.name for p in data.iterdir())
        version = cab.publish_catalog()
        cab.wait_catalog(version)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        cab.stop()


@pytest.mark.parametrize("delay_s", [0.15, 0.3, 0.5, 0.8, 1.2])
def test_sigterm_while_starting_exits_0(tmp_path: Path, delay_s: float) -> None:
    cab = _bare(tmp_path)
    try:
        proc = _run(cab)
        time.sleep(delay_s)   # not synchronisation: the point is a signal at an arbitrary moment of the start
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (proc.returncode, err[-2000:])
        assert "Traceback" not in err
    finally:
        cab.stop()


class NotifySocket:
    """The NOTIFY_SOCKET systemd would own: collects every datagram the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def count(self, msg: str, since: float = 0.0) -> int:
        return sum(1 for t, m in list(self.messages) if m == msg and t >= since)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_notify_ready_watchdog_from_a_healthy_core_loop_and_stopping(tmp_path: Path) -> None:
    cab = _bare(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        proc = _run(cab, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
        wait_until(lambda: notify.count("READY=1") == 1, 30, "READY=1")
        start = time.monotonic()
        wait_until(lambda: notify.count("WATCHDOG=1", since=start) >= 5, 10, "periodic WATCHDOG=1")

        # Stall the core loop for real: another process holds the ledger's write lock, and the
        # core's next write (a price change through cabinetctl) waits on it.
        holder = sqlite3.connect(cab.workdir / "data" / "ledger.db", isolation_level=None, timeout=10)
        holder.execute("BEGIN EXCLUSIVE")
        ctl = subprocess.Popen([sys.executable, "-m", "agent.cli.cabinetctl", "--config", str(cab.config_path),
                                "price", "A1", "990"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: _stalled(notify, 1.0), 15, "WATCHDOG=1 to stop while the core loop is stalled")
        holder.execute("ROLLBACK")
        holder.close()
        resumed = time.monotonic()
        wait_until(lambda: notify.count("WATCHDOG=1", since=resumed) >= 3, 15, "WATCHDOG=1 again")
        ctl.communicate(timeout=30)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify.count("STOPPING=1") == 1
    finally:
        notify.close()
        cab.stop()


def _stalled(notify: NotifySocket, quiet_s: float) -> bool:
    """No WATCHDOG=1 for ``quiet_s`` although the watchdog period is 0.2 s."""
    beats = [t for t, m in list(notify.messages) if m == "WATCHDOG=1"]
    return bool(beats) and time.monotonic() - beats[-1] >= quiet_s
