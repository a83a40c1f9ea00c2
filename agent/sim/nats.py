"""A private nats-server with JetStream and its MQTT gateway, for the MQTT 3.1.1 tests.

NATS's MQTT gateway speaks only MQTT 3.1.1 (an MQTT 5 CONNECT is refused), keeps persistent
sessions and retained messages in JetStream, and limits a message to ``max_payload``
(default 1 MB, raised here so that catalog snapshots fit). Like ``PrivateBroker``: its own
process, free ports, its own store directory, nothing shared with the machine. ``port`` is the
MQTT port (what the agent and the reference platform connect to).
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.sim.broker import BrokerError
from agent.sim.server import ServerProcess, find_binary, free_port

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/sbin/nats-server"
START_TIMEOUT_S = 15.0
_PORT_ATTEMPTS = 5


def find_nats_server() -> str:
    found = find_binary("nats-server", DEFAULT_BINARY)
    if found is None:
        raise BrokerError("nats-server not found on PATH nor at /usr/sbin/nats-server (apt-get install nats-server)")
    return found


class PrivateNats(ServerProcess):
    """nats-server (JetStream + MQTT) of our own, started by the constructor unless ``autostart=False``."""

    NAME = "nats-server"
    READY_TEXT = "Server is ready"
    STOP_TIMEOUT_S = 10.0     # ``restart()`` keeps the ports; JetStream keeps sessions and retained messages

    def __init__(self, log_dir: Path | None = None, *, host: str = "127.0.0.1", max_payload_mb: int = 8,
                 ack_wait_s: float | None = None, binary: str | None = None, autostart: bool = True) -> None:
        """``ack_wait_s``: how long NATS waits for a PUBACK before it delivers a QoS 1 message again
        (its default is 30 s; NATS redelivers on that timer, not on a reconnect)."""
        super().__init__(binary or find_nats_server(), "cab-nats-", log_dir, host, START_TIMEOUT_S)
        self.port = 0        # MQTT
        self.nats_port = 0
        self.max_payload = max_payload_mb << 20
        self.ack_wait_s = ack_wait_s
        self._autostart(autostart)

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
        return self._launch(self._workdir / "nats.conf", self.config_text(), (self.port,))

    def __repr__(self) -> str:
        return f"PrivateNats(mqtt://{self.host}:{self.port}, {'running' if self.running else 'stopped'})"
