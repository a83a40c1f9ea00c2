"""A private Mosquitto broker for the demo, the tests and the benchmarks.

Each instance runs its own ``mosquitto`` process on its own port with a generated
config, so tests never share a broker (or its retained messages and sessions) and
never depend on a system broker. The default ``profile="tuned"`` opens the limits up on
purpose: the agent's offline backlog lives in persistent sessions and must not be dropped by
the broker (``max_queued_messages``), a full catalog snapshot may be as large as MQTT allows
(``max_packet_size``), and ``set_tcp_nodelay`` is on. ``profile="stock"`` keeps Mosquitto's
own defaults instead (Nagle on, 20 in flight, 1000 queued), which is what a platform we do not
own may run: the benchmarks measure the agent against both.

Optional, additive: a TLS listener beside the plain one (``tls=TlsListener(...)``, mutual TLS
with ``require_certificate``), a ``password_file`` and an ``acl_file`` (anonymous clients are
then refused unless ``allow_anonymous=True``), persistence (``persistence_dir``), and
``extra_config`` lines appended as they are (e.g. the listeners of an example config).
"""

from __future__ import annotations

import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError
from agent.sim.server import ServerProcess, find_binary, free_port

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/sbin/mosquitto"
# The largest packet MQTT can encode (remaining length of 4 bytes): 256 MiB - 1.
MAX_PACKET_SIZE = 268_435_455
START_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 8


class BrokerError(AgentError):
    """The private broker could not be found, started or stopped."""


def find_mosquitto() -> str:
    """The mosquitto binary: on PATH, else the Debian location (it lives in /usr/sbin)."""
    found = find_binary("mosquitto", DEFAULT_BINARY)
    if found is None:
        raise BrokerError("mosquitto not found on PATH nor at /usr/sbin/mosquitto (apt-get install mosquitto)")
    return found


PROFILES = ("tuned", "stock")


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener: the server's certificate and key, and for mutual TLS the CA clients need."""

    certfile: Path
    keyfile: Path
    cafile: Path | None = None
    require_certificate: bool = False
    use_identity_as_username: bool = False
    port: int | None = None  # None: a free port


class PrivateBroker(ServerProcess):
    """A Mosquitto process of our own, started by the constructor (unless ``autostart=False``).

    ``port=None`` picks a free port (retrying if another process grabs it first);
    ``restart()`` keeps the port so clients can reconnect to the same address.
    ``persistence_dir`` makes sessions and retained messages survive ``restart()``.
    ``tls_port`` is the TLS listener's port when ``tls`` is given.
    """

    NAME = "mosquitto"
    READY_TEXT = " running"

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_dir: Path | None = None,
        *,
        persistence_dir: Path | None = None,
        binary: str | None = None,
        autostart: bool = True,
        start_timeout: float = START_TIMEOUT_S,
        profile: str = "tuned",
        tls: TlsListener | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
        extra_config: str = "",
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
        super().__init__(binary or find_mosquitto(), "cab-mosquitto-", log_dir, host, start_timeout)
        self._fixed_port = port
        self.port: int = port or 0
        self.profile = profile
        self.tls = tls
        self.tls_port: int = (tls.port or 0) if tls is not None else 0
        self._password_file = password_file
        self._acl_file = acl_file
        self._allow_anonymous = allow_anonymous if allow_anonymous is not None else password_file is None
        self._extra_config = extra_config
        self._persistence_dir = Path(persistence_dir) if persistence_dir is not None else None
        self._tls_fixed = False
        self._autostart(autostart)

    # -- public API -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> PrivateBroker:
        """Start mosquitto and return once it accepts TCP connections; idempotent."""
        if self.running:
            return self
        if self._persistence_dir is not None:
            self._persistence_dir.mkdir(parents=True, exist_ok=True)
        auto = not self.port
        auto_tls = self.tls is not None and not (self.tls.port or self._tls_fixed)
        last_error = ""
        for attempt in range(_PORT_ATTEMPTS if auto or auto_tls else 1):
            port = free_port(self.host) if auto else self.port
            if auto_tls:
                self.tls_port = free_port(self.host)
            ok, last_error, in_use = self._try_start(port)
            if ok:
                self.port = port
                self._tls_fixed = self.tls is not None  # restart() keeps the TLS port too
                log.info("mosquitto pid %d listening on %s:%d%s", self.pid, self.host, port,
                         f" (TLS on {self.tls_port})" if self.tls is not None else "")
                return self
            if not in_use:
                break
            log.debug("port %d taken before mosquitto bound it (attempt %d)", port, attempt + 1)
        raise BrokerError(f"mosquitto did not start on {self.host}:{self.port or 'a free port'}: {last_error}")

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"PrivateBroker({self.url}, {state})"

    # -- internals --------------------------------------------------------------

    def config_text(self, port: int) -> str:
        """The generated mosquitto.conf (2.0 syntax): a plain listener (and a TLS one), per profile."""
        lines = [
            "per_listener_settings false",
            f"listener {port} {self.host}",
            f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
        ]
        if self.profile == "tuned":
            lines += [
                "set_tcp_nodelay true",
                # Offline persistent sessions must keep the whole backlog, however long.
                "max_queued_messages 0",
                "max_queued_bytes 0",
                "max_inflight_messages 0",
                "max_inflight_bytes 0",
                f"max_packet_size {MAX_PACKET_SIZE}",
            ]
        if self._password_file is not None:
            lines.append(f"password_file {self._password_file}")
        if self._acl_file is not None:
            lines.append(f"acl_file {self._acl_file}")
        if self.tls is not None:
            t = self.tls
            lines += [f"listener {self.tls_port} {self.host}", f"certfile {t.certfile}", f"keyfile {t.keyfile}",
                      "tls_version tlsv1.2"]
            if t.cafile is not None:
                lines.append(f"cafile {t.cafile}")
            lines.append(f"require_certificate {'true' if t.require_certificate else 'false'}")
            if t.use_identity_as_username:
                lines.append("use_identity_as_username true")
        lines += [
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self._extra_config:
            lines += ["# extra", self._extra_config.strip()]
        if os.geteuid() == 0:
            # mosquitto drops root to user "mosquitto", which could not read our files.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self._persistence_dir is not None:
            lines += ["persistence true", f"persistence_location {self._persistence_dir}/"]
        else:
            lines.append("persistence false")
        return "\n".join(lines) + "\n"

    def _try_start(self, port: int) -> tuple[bool, str, bool]:
        """One start attempt: (started, error text, failed because the port was taken)."""
        # "running" is logged after every listener is open; the TCP probe then proves the port
        # is ours (a stranger on a stolen port would have made us exit).
        ports = (port,) if self.tls is None else (port, self.tls_port)
        return self._launch(self._workdir / f"mosquitto-{port}.conf", self.config_text(port), ports)
