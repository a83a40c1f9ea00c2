"""A private nats-server with JetStream and its MQTT gateway, for the MQTT 3.1.1 tests.

NATS's MQTT gateway speaks only MQTT 3.1.1 (an MQTT 5 CONNECT is refused), keeps persistent
sessions and retained messages in JetStream, and limits a message to ``max_payload``
(default 1 MB, raised here so that catalog snapshots fit). Like ``PrivateBroker``: its own
process, free ports, its own store directory, nothing shared with the machine. ``port`` is the
MQTT port (what the agent and the reference platform connect to).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from agent.sim.broker import BrokerError, _accepts, _read_from, _tail, free_port

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/sbin/nats-server"
START_TIMEOUT_S = 15.0
_POLL_S = 0.02
_PORT_ATTEMPTS = 5


def find_nats_server() -> str:
    found = shutil.which("nats-server")
    if found:
        return found
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    raise BrokerError("nats-server not found on PATH nor at /usr/sbin/nats-server (apt-get install nats-server)")


class PrivateNats:
    """nats-server (JetStream + MQTT) of our own, started by the constructor unless ``autostart=False``."""

    def __init__(self, log_dir: Path | None = None, *, host: str = "127.0.0.1", max_payload_mb: int = 8,
                 ack_wait_s: float | None = None, binary: str | None = None, autostart: bool = True) -> None:
        """``ack_wait_s``: how long NATS waits for a PUBACK before it delivers a QoS 1 message again
        (its default is 30 s; NATS redelivers on that timer, not on a reconnect)."""
        self.host = host
        self.port = 0        # MQTT
        self.nats_port = 0
        self.max_payload = max_payload_mb << 20
        self.ack_wait_s = ack_wait_s
        self._binary = binary or find_nats_server()
        self._workdir = Path(tempfile.mkdtemp(prefix="cab-nats-"))
        self._log_dir = Path(log_dir) if log_dir is not None else self._workdir
        self._proc: subprocess.Popen[bytes] | None = None
        if autostart:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def log_path(self) -> Path:
        return self._log_dir / f"{self._workdir.name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config_text(self) -> str:
        return "\n".join([
            "server_name: cab-test",
            f"listen: {self.host}:{self.nats_port}",
            f"max_payload: {self.max_payload}",
            f"max_pending: {max(64 << 20, 2 * self.max_payload)}",
            f'jetstream {{ store_dir: "{self._workdir}/js" }}',
            f'mqtt {{ listen: "{self.host}:{self.port}"'
            + (f', ack_wait: "{int(self.ack_wait_s * 1000)}ms"' if self.ack_wait_s else "") + " }",
        ]) + "\n"

    def start(self) -> PrivateNats:
        """Start and return once the MQTT port accepts connections; idempotent."""
        if self.running:
            return self
        self._log_dir.mkdir(parents=True, exist_ok=True)
        fixed = bool(self.port)
        error = ""
        for _ in range(1 if fixed else _PORT_ATTEMPTS):
            if not fixed:
                self.port, self.nats_port = free_port(self.host), free_port(self.host)
            ok, error, in_use = self._try_start()
            if ok:
                log.info("nats-server pid %d: MQTT on %s:%d", self._proc.pid if self._proc else 0, self.host, self.port)
                return self
            if not in_use:
                break
        raise BrokerError(f"nats-server did not start: {error}")

    def _try_start(self) -> tuple[bool, str, bool]:
        conf = self._workdir / "nats.conf"
        conf.write_text(self.config_text(), encoding="utf-8")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log_file:
            proc = subprocess.Popen([self._binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            output = _read_from(self.log_path, offset)
            if proc.poll() is not None:
                return False, _tail(output), "address already in use" in output.lower()
            if "Server is ready" in output and _accepts(self.host, self.port):
                self._proc = proc
                return True, "", False
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return False, f"not ready after {START_TIMEOUT_S} s; log: {_tail(output)}", False
            try:
                proc.wait(_POLL_S)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self) -> None:
        """Stop and start on the same ports; JetStream keeps sessions and retained messages."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> PrivateNats:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivateNats(mqtt://{self.host}:{self.port}, {'running' if self.running else 'stopped'})"
