"""The pty plumbing both device simulators share, and a stable name for their pty.

A simulator is a device on the far end of a pseudo-terminal: the agent opens the slave side
(``port``) exactly as it opens a USB adapter, and one reader thread of the simulator reads
the master side, hands the bytes to the device's framing, and writes its replies back at
line speed if asked to. Only the framing and the device's behaviour differ between the lock
board and the scales, so only they live in the subclasses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


class PtyDevice:
    """A simulated serial device behind a pty, served by one reader thread.

    Subclasses implement ``_on_bytes(buf)`` (take the complete frames off the front of the
    buffer and answer them with ``_write``) and, when incomplete frames must be dropped after
    a silence on the line, set ``silence_s`` and implement ``_on_silence(buf)``.
    """

    silence_s: float | None = None
    """Silence after which ``_on_silence`` is called while bytes are pending (None: never)."""

    def __init__(self, name: str, byte_time_s: float = 0.0) -> None:
        if byte_time_s < 0:
            raise ValueError(f"byte_time_s must be >= 0, got {byte_time_s}")
        self.byte_time_s = byte_time_s
        self._thread_name = name
        self._port: str | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._wake: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> str:
        """Path of the pty's slave side: what the agent opens as its serial port."""
        if self._port is None:
            raise RuntimeError("simulator not started")
        return self._port

    def start(self) -> Self:
        """Open the pty pair and start answering; ``port`` is then the device to open."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        master, slave = os.openpty()
        # Raw before anyone opens it: no echo, no CR/LF translation, no line buffering.
        tty.setraw(slave)
        # The slave fd stays open for the simulator's life, so reads on the master do not fail
        # with EIO while the agent has the port closed (e.g. reopening after an error).
        self._master, self._slave = master, slave
        self._wake = os.pipe()
        self._port = os.ttyname(slave)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the reader thread and close every fd; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            assert self._wake is not None
            os.write(self._wake[1], b"x")
            thread.join(timeout=5)
        for fd in (self._master, self._slave, *(self._wake or ())):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = self._wake = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- for the subclasses --------------------------------------------------------------------
    def _on_bytes(self, buf: bytearray) -> None:
        """New bytes were appended to ``buf``: answer the complete frames at its front."""
        raise NotImplementedError

    def _on_silence(self, buf: bytearray) -> None:
        """The line was quiet for ``silence_s`` with bytes pending in ``buf``."""

    def _write(self, data: bytes) -> None:
        """Send ``data`` to the agent, one byte every ``byte_time_s`` when that is set."""
        assert self._master is not None
        if self.byte_time_s <= 0:
            view = memoryview(data)
            while view:
                view = view[os.write(self._master, view):]
            return
        for i in range(len(data)):
            if self._stop.wait(self.byte_time_s):
                return
            os.write(self._master, data[i : i + 1])

    # -- the reader thread --------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._master is not None and self._wake is not None
        master, wake = self._master, self._wake[0]
        buf = bytearray()
        while not self._stop.is_set():
            timeout = self.silence_s if buf else None
            ready, _, _ = select.select([master, wake], [], [], timeout)
            if wake in ready:
                return
            try:
                if not ready:
                    self._on_silence(buf)
                    continue
                try:
                    chunk = os.read(master, 4096)
                except OSError as exc:
                    log.warning("%s: pty read failed: %s", self._thread_name, exc)
                    return
                buf += chunk
                self._on_bytes(buf)
            except OSError as exc:  # a reply could not be written
                if self._stop.is_set():
                    return
                log.warning("%s: pty write failed: %s", self._thread_name, exc)


@contextlib.contextmanager
def pty_symlink(target: str, link: str | None) -> Iterator[None]:
    """Point ``link`` at ``target`` while the block runs (no-op when ``link`` is None).

    A stable name a config can hold (``/tmp/cabinet-sim/lockboard``) for a pty whose own
    name changes at every start.
    """
    if not link:
        yield
        return
    path = Path(link)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.readlink(path) == target:
                path.unlink()
