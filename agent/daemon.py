"""``cabinet-agent run``: wires the threads around the core and runs until SIGTERM/SIGINT.

Threads and what each owns:
  core        the ledger, the sessions, the cabinet state (agent.core)
  lockboard   the lock board's serial port (agent.devices)
  scales      the scale bus's serial port (agent.devices)
  camera      the camera (drivers.camera.scanner)
  mqtt        the paho client and its socket (agent.mqtt_link)
  catalog     catalog installs (agent.catalog_worker)
  control     the control socket, one short thread per cabinetctl request (agent.control)
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from agent.catalog_worker import CatalogWorker
from agent.config import Config
from agent.control import ControlServer
from agent.control_handlers import Operator
from agent.core import Core
from agent.devices import LockboardThread, ScaleThread
from agent.errors import AgentError
from agent.events import CameraDegraded, DeviceFault, DeviceKind, DeviceRecovered, ScanSeen
from agent.mqtt_link import MqttLink

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 0.001   # the GIL handed over after 1 ms instead of 5 (see Daemon._start)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) our state, without a dependency; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


class AlreadyRunning(AgentError):
    """Another daemon holds this data_dir."""


def instance_lock(path: Path) -> TextIO:
    """An exclusive lock held for the daemon's lifetime: two daemons on one ledger would
    write the same seq, fight over the serial ports and kick each other off the broker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise AlreadyRunning(f"another cabinet-agent is already running on {path.parent} (lock {path})") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


class StartFailed(AgentError):
    """A start that cannot complete; the message is the one line the operator sees."""


class Daemon:
    """Owns every thread of a running cabinet; ``run_forever`` is ``cabinet-agent run``."""

    def __init__(self, cfg: Config, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.stop_requested = stop or threading.Event()
        self._lock = instance_lock(cfg.data_dir / "agent.lock")
        self.core = Core(cfg, heartbeat=_watchdog(), heartbeat_s=watchdog_interval_s() or 10.0)
        self.catalog_worker: CatalogWorker | None = None
        self.lockboard: LockboardThread | None = None
        self.scales: ScaleThread | None = None
        self.camera: Any = None
        self.link: MqttLink | None = None
        self.control: ControlServer | None = None

    def start(self) -> bool:
        """Start every part; False when a stop was asked for meanwhile (what started is stopped
        again). A part that cannot start raises StartFailed after stopping the others, and
        nothing is recorded: ``agent_started`` is written only once everything runs."""
        try:
            return self._start()
        except (AgentError, OSError, ValueError, ssl.SSLError) as exc:
            self._stop_parts()
            self.core.finish()
            raise StartFailed(_one_line(exc)) from None

    def _start(self) -> bool:
        cfg, core = self.cfg, self.core
        # The threads mostly wait on sockets and ptys; when one wakes with work (the lock board's
        # thread with an unlock to send), it should not wait out another thread's 5 ms slice of
        # the GIL: latency before throughput.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if not cfg.doors:
            log.warning("no [[doors]] configured: this cabinet cannot run shopping sessions")
        core.start()
        steps = (self._start_catalog, self._start_lockboard, self._start_scales, self._start_camera,
                 self._start_link, self._start_control)
        for step in steps:
            if self.stop_requested.is_set():
                self._stop_parts()
                core.finish()
                return False
            step()
        core.record_started()
        # What start-up built (modules, config, catalog cache, threads) lives until the end: move
        # it out of the cyclic collector's reach, so that a full collection never pauses a command
        # on its way to the unlock frame for scanning it again (tens of ms on a small board).
        gc.collect()
        gc.freeze()
        return True

    def _start_catalog(self) -> None:
        self.catalog_worker = CatalogWorker(self.core.catalog, self.core.post)
        self.core.ports.catalog = self.catalog_worker
        self.catalog_worker.start()

    def _start_lockboard(self) -> None:
        lb = self.cfg.lockboard
        self.lockboard = LockboardThread(lb.port, lb.baudrate, lb.address, lb.feedback_open, lb.reply_timeout_s,
                                         lb.poll_interval_s, lb.fault_after, self.core.post)
        self.core.ports.lockboard = self.lockboard
        self.lockboard.start()

    def _start_scales(self) -> None:
        sc = self.cfg.scale
        self.scales = ScaleThread(sc.port, sc.baudrate, [ln.channel for ln in self.cfg.lanes], sc.settle_s,
                                  sc.reply_timeout_s, sc.fault_after, self.core.post)
        self.scales.start()

    def _start_camera(self) -> None:
        source = self.cfg.camera.source
        if not source:
            return
        from drivers.camera.scanner import CameraScanner

        core = self.core
        scanner = CameraScanner(
            source, self.cfg.camera.fps,
            on_scan=lambda s: core.post(ScanSeen(s.symbology, s.text, s.gtin)),
            on_fault=lambda detail: core.post(DeviceFault(DeviceKind.CAMERA, None, detail)),
            on_recovered=lambda: core.post(DeviceRecovered(DeviceKind.CAMERA, None)),
            on_degraded=lambda detail: core.post(CameraDegraded(tuple(scanner.missing_decoders), detail)),
            on_degraded_cleared=lambda: core.post(CameraDegraded(())),
        )
        scanner.start()
        self.camera = scanner

    def _start_link(self) -> None:
        core = self.core
        assert self.catalog_worker is not None
        # commands are acked by the core once their outcome is committed; catalog documents go
        # straight to the installer (spooled to disk when large), which acks them when done
        self.link = MqttLink(self.cfg.platform, self.cfg.cabinet.id, core.inbox, core.topics.subscriptions(),
                             will=core.offline_status(), will_topic=core.topics.status,
                             held_topics=(core.topics.cmd,), catalog_sink=self.catalog_worker.submit,
                             spool_dir=self.cfg.data_dir)
        core.ports.link = self.link
        self.link.start()

    def _start_control(self) -> None:
        assert self.catalog_worker is not None
        self.control = ControlServer(self.cfg.cabinet.control_socket, Operator(self.core, self.catalog_worker).handle)
        self.control.start()

    def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or until the core thread dies (exit 1)."""
        stop = self.stop_requested
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, _frame: _signalled(stop, signum))
            signal.signal(signal.SIGINT, lambda signum, _frame: _signalled(stop, signum))
        if not self.start():
            log.info("stopped while starting")
            return 0
        core_thread = threading.Thread(target=self.core.run, name="core")
        core_thread.start()
        sd_notify("READY=1\nSTATUS=running")
        log.info("cabinet %s running", self.cfg.cabinet.id)
        while not stop.is_set() and core_thread.is_alive():
            stop.wait(1.0)
        died = not core_thread.is_alive()
        if died:
            log.error("the core thread died; stopping so that systemd restarts the agent")
        sd_notify("STOPPING=1")
        self.shutdown(core_thread)
        return 1 if died else 0

    def shutdown(self, core_thread: threading.Thread) -> None:
        """Refuse new sessions, let a session whose door is shut record its sale, say goodbye
        on MQTT (commands not yet received stay queued in our broker session for the next
        start), stop the devices, then the core (it flushes and closes the ledger)."""
        core = self.core
        core.state.stopping = True
        if self.control is not None:
            self.control.stop()
            self.control = None
        deadline = time.monotonic() + self.cfg.scale.settle_s + 3.0
        while core_thread.is_alive() and core.settling() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.link is not None:
            self.link.stop(last_words=(core.topics.status, core.offline_status()))
            self.link = None
        self._stop_parts()
        core.stop()
        core_thread.join(10)
        if core_thread.is_alive():
            log.error("the core thread did not stop in time")
        elif not core.finished:
            core.finish()
        log.info("stopped")

    def _stop_parts(self) -> None:
        """Stop whatever was started, in reverse order; each at most once."""
        if self.control is not None:
            self.control.stop()
            self.control = None
        if self.link is not None:
            self.link.stop()
            self.link = None
        for name in ("camera", "scales", "lockboard", "catalog_worker"):
            part = getattr(self, name)
            if part is not None:
                part.stop()
                setattr(self, name, None)


def _signalled(stop: threading.Event, signum: int) -> None:
    log.info("signal %d: stopping", signum)
    stop.set()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.strerror or text}: {exc.filename}"
    return text


def _watchdog() -> Callable[[], None] | None:
    """systemd's watchdog (``WatchdogSec=``): the core loop calls this while it is healthy."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return lambda: sd_notify("WATCHDOG=1")


def watchdog_interval_s() -> float | None:
    """Half the watchdog period, as sd_watchdog_enabled(3) advises."""
    try:
        return int(os.environ["WATCHDOG_USEC"]) / 2e6
    except (KeyError, ValueError):
        return None
