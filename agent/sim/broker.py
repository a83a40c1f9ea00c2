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
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agent.errors import AgentError

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/sbin/mosquitto"
# The largest packet MQTT can encode (remaining length of 4 bytes): 256 MiB - 1.
MAX_PACKET_SIZE = 268_435_455
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_PORT_ATTEMPTS = 8
_POLL_S = 0.01


class BrokerError(AgentError):
    """The private broker could not be found, started or stopped."""


def find_mosquitto() -> str:
    """The mosquitto binary: on PATH, else the Debian location (it lives in /usr/sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    raise BrokerError("mosquitto not found on PATH nor at /usr/sbin/mosquitto (apt-get install mosquitto)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; the caller must cope with losing the race."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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


class PrivateBroker:
    """A Mosquitto process of our own, started by the constructor (unless ``autostart=False``).

    ``port=None`` picks a free port (retrying if another process grabs it first);
    ``restart()`` keeps the port so clients can reconnect to the same address.
    ``persistence_dir`` makes sessions and retained messages survive ``restart()``.
    ``tls_port`` is the TLS listener's port when ``tls`` is given.
    """

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
        self.host = host
        self._fixed_port = port
        self.port: int = port or 0
        self.profile = profile
        self.tls = tls
        self.tls_port: int = (tls.port or 0) if tls is not None else 0
        self._password_file = password_file
        self._acl_file = acl_file
        self._allow_anonymous = allow_anonymous if allow_anonymous is not None else password_file is None
        self._extra_config = extra_config
        self._binary = binary or find_mosquitto()
        self._workdir = Path(tempfile.mkdtemp(prefix="cab-mosquitto-"))
        self._log_dir = Path(log_dir) if log_dir is not None else self._workdir
        self._persistence_dir = Path(persistence_dir) if persistence_dir is not None else None
        self._start_timeout = start_timeout
        self._tls_fixed = False
        self._proc: subprocess.Popen[bytes] | None = None
        if autostart:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- public API -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where mosquitto's own log goes (appended across restarts)."""
        return self._log_dir / f"{self._workdir.name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> PrivateBroker:
        """Start mosquitto and return once it accepts TCP connections; idempotent."""
        if self.running:
            return self
        self._workdir.mkdir(parents=True, exist_ok=True)  # close() removed it; start() may follow
        self._log_dir.mkdir(parents=True, exist_ok=True)
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

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Terminate mosquitto (SIGTERM, so a persistence dir gets saved) and wait for it; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto pid %d ignored SIGTERM for %.1f s, killing it", proc.pid, timeout)
                proc.kill()
                proc.wait(timeout)
        log.info("mosquitto on port %d stopped (rc %s)", self.port, proc.returncode)

    def kill(self) -> None:
        """SIGKILL, like a crash or power cut: nothing is saved, clients see their sockets die."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port: every client sees its connection drop."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the generated config (the log stays if it was put in log_dir)."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> PrivateBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
        conf = self._workdir / f"mosquitto-{port}.conf"
        conf.write_text(self.config_text(port), encoding="utf-8")
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
            output = _read_from(log_path, offset)
            if proc.poll() is not None:
                return False, _tail(output), "Address already in use" in output
            # "running" is logged after every listener is open; the TCP probe then proves
            # the port is ours (a stranger on a stolen port would have made us exit).
            if " running" in output and _accepts(self.host, port) and (
                    self.tls is None or _accepts(self.host, self.tls_port)):
                self._proc = proc
                return True, "", False
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return False, f"not accepting connections after {self._start_timeout} s; log: {_tail(output)}", False
            try:
                proc.wait(_POLL_S)  # returns at once if it exits
            except subprocess.TimeoutExpired:
                pass


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
