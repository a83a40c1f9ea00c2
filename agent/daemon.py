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
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from agent.catalog_worker import CatalogWorker
from agent.config import Config
from agent.control import ControlServer
from agent.core import Core
from agent.errors import AgentError
from agent.devices import LockboardThread, ScaleThread
from agent.events import DeviceFault, DeviceKind, DeviceRecovered, ScanSeen
from agent.mqtt_link import MqttLink
from agent.control_handlers import Operator

log = logging.getLogger(__name__)


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


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._lock = instance_lock(cfg.data_dir / "agent.lock")
        self.core = Core(cfg)
        self.threads: list[Any] = []

    def start(self) -> None:
        cfg, core = self.cfg, self.core
        if not cfg.doors:
            log.warning("no [[doors]] configured: this cabinet cannot run shopping sessions")
        core.start()
        self.catalog_worker = CatalogWorker(core.catalog, core.post)
        core.ports.catalog = self.catalog_worker
        self.catalog_worker.start()
        self.lockboard = LockboardThread(
            cfg.lockboard.port, cfg.lockboard.baudrate, cfg.lockboard.address, cfg.lockboard.feedback_open,
            cfg.lockboard.reply_timeout_s, cfg.lockboard.poll_interval_s, cfg.lockboard.fault_after, core.post)
        core.ports.lockboard = self.lockboard
        self.lockboard.start()
        self.scales = ScaleThread(
            cfg.scale.port, cfg.scale.baudrate, [ln.channel for ln in cfg.lanes], cfg.scale.settle_s,
            cfg.scale.reply_timeout_s, cfg.scale.fault_after, core.post)
        self.scales.start()
        self.camera = self._start_camera()
        self.link = MqttLink(cfg.platform, cfg.cabinet.id, core.inbox, core.topics.subscriptions(),
                             will=core.offline_status(), will_topic=core.topics.status)
        core.ports.link = self.link
        self.link.start()
        self.control = ControlServer(cfg.cabinet.control_socket, Operator(core, self.catalog_worker).handle)
        self.control.start()

    def _start_camera(self) -> Any:
        source = self.cfg.camera.source
        if not source:
            return None
        from drivers.camera.scanner import CameraScanner

        core = self.core
        scanner = CameraScanner(
            source, self.cfg.camera.fps,
            on_scan=lambda s: core.post(ScanSeen(s.symbology, s.text, s.gtin)),
            on_fault=lambda detail: core.post(DeviceFault(DeviceKind.CAMERA, None, detail)),
            on_recovered=lambda: core.post(DeviceRecovered(DeviceKind.CAMERA, None)),
        )
        scanner.start()
        return scanner

    def run_forever(self) -> int:
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %d: stopping", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        core_thread = threading.Thread(target=self.core.run, name="core")
        core_thread.start()
        sd_notify("READY=1\nSTATUS=running")
        log.info("cabinet %s running", self.cfg.cabinet.id)
        while not stop.is_set() and core_thread.is_alive():
            stop.wait(1.0)
        sd_notify("STOPPING=1")
        self.shutdown(core_thread)
        return 0

    def shutdown(self, core_thread: threading.Thread) -> None:
        """Refuse new sessions, let a session whose door is shut record its sale, say goodbye
        on MQTT (commands not yet received stay queued in our broker session for the next
        start), stop the devices, then the core (it flushes and closes the ledger)."""
        core = self.core
        core.state.stopping = True
        self.control.stop()
        deadline = time.monotonic() + self.cfg.scale.settle_s + 3.0
        while core_thread.is_alive() and core.settling() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.link.stop(last_words=(core.topics.status, core.offline_status()))
        if self.camera is not None:
            self.camera.stop()
        self.lockboard.stop()
        self.scales.stop()
        self.catalog_worker.stop()
        core.stop()
        core_thread.join(10)
        log.info("stopped")
