"""A server binary of our own (mosquitto, nats-server) for the demo, the tests and the benchmarks.

What both private brokers share: a work directory for the generated config, a log file that
restarts append to, a start that waits until the server logs it is ready *and* its ports accept
TCP connections (a stranger on a stolen port makes the server exit, which the caller retries on
another port), a stop by SIGTERM (so a persistence directory gets saved) with SIGKILL after a
timeout, a kill like a power cut, and clean-up of the work directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

POLL_S = 0.01


def find_binary(name: str, default: str) -> str | None:
    """A server binary: on PATH, else its Debian location (mosquitto lives in /usr/sbin); None
    when neither is there (the caller says how to install it)."""
    found = shutil.which(name)
    if found:
        return found
    return default if os.access(default, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; the caller must cope with losing the race."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One server process with a generated config; subclasses say how to configure and start it."""

    NAME = "server"
    READY_TEXT = ""          # what the server logs once every listener is open
    STOP_TIMEOUT_S = 5.0

    def __init__(self, binary: str, workdir_prefix: str, log_dir: Path | None, host: str,
                 start_timeout: float) -> None:
        self.host = host
        self._binary = binary
        self._workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix))
        self._log_dir = Path(log_dir) if log_dir is not None else self._workdir
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def _autostart(self, autostart: bool) -> None:
        if autostart:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    def start(self) -> Self:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """Where the server's own log goes (appended across restarts)."""
        return self._log_dir / f"{self._workdir.name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _launch(self, conf: Path, text: str, ports: tuple[int, ...]) -> tuple[bool, str, bool]:
        """One start attempt with config ``text``: (started, error text, failed because a port was taken)."""
        self._workdir.mkdir(parents=True, exist_ok=True)  # close() removed it; start() may follow
        self._log_dir.mkdir(parents=True, exist_ok=True)
        conf.write_text(text, encoding="utf-8")
        log_path = self.log_path
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [self._binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the demo's terminal is ours to handle
            )
        deadline = time.monotonic() + self._start_timeout
        while True:
            output = read_from(log_path, offset)
            if proc.poll() is not None:
                return False, tail(output), "address already in use" in output.lower()
            if self.READY_TEXT in output and all(accepts(self.host, port) for port in ports):
                self._proc = proc
                return True, "", False
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return False, f"not ready after {self._start_timeout} s; log: {tail(output)}", False
            try:
                proc.wait(POLL_S)  # returns at once if it exits
            except subprocess.TimeoutExpired:
                pass

    def stop(self, timeout: float | None = None) -> None:
        """Terminate (SIGTERM, so a persistence dir gets saved) and wait; idempotent."""
        timeout = self.STOP_TIMEOUT_S if timeout is None else timeout
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s pid %d ignored SIGTERM for %.1f s, killing it", self.NAME, proc.pid, timeout)
                proc.kill()
                proc.wait(timeout)
        log.info("%s pid %d stopped (rc %s)", self.NAME, proc.pid, proc.returncode)

    def kill(self) -> None:
        """SIGKILL, like a crash or power cut: nothing is saved, clients see their sockets die."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports: every client sees its connection drop."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the generated config (the log stays if it was put in log_dir)."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
