"""A request/reply serial link over any pyserial URL: flush, write, read until a frame is complete.

One link object is owned by exactly one thread (the device's poller). After an I/O error the
port is closed and reopened on the next request, so a USB adapter that went away and came
back is picked up again without restarting the daemon.
"""

from __future__ import annotations

import logging
import termios
import time
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

import serial

from drivers.errors import LinkError, LinkTimeout

log = logging.getLogger(__name__)

# A vanished USB adapter makes pyserial's flush and reset raise termios.error, which is no OSError.
_PORT_ERRORS = (serial.SerialException, OSError, termios.error)
T = TypeVar("T")

# extract(buffer) -> a decoded reply, or None while more bytes are needed; it deletes from
# the front of ``buffer`` any bytes that cannot start a valid reply (resync).
Extractor = Callable[[bytearray], "T | None"]


class _Port(Protocol):
    """What the link uses of a port: every class ``serial_for_url`` returns (a tty, ``loop://``,
    ``socket://``) has it, their common base ``SerialBase`` does not declare it all."""

    @property
    def in_waiting(self) -> int: ...
    def reset_input_buffer(self) -> None: ...
    def write(self, data: bytes, /) -> int | None: ...
    def flush(self) -> None: ...
    def read(self, size: int = 1, /) -> bytes: ...
    def close(self) -> None: ...


class SerialLink:
    def __init__(self, url: str, baudrate: int = 9600, timeout_s: float = 0.3) -> None:
        self.url = url
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self._port: _Port | None = None

    def open(self) -> None:
        if self._port is not None:
            return
        try:
            self._port = cast(_Port, serial.serial_for_url(
                self.url, baudrate=self.baudrate, bytesize=8, parity="N", stopbits=1, timeout=0.01
            ))
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkError(f"cannot open {self.url}: {exc}") from exc
        log.info("opened serial port %s at %d baud", self.url, self.baudrate)

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except _PORT_ERRORS:
                pass

    @property
    def is_open(self) -> bool:
        return self._port is not None

    def transact(self, request: bytes, extract: Callable[[bytearray], T | None], timeout_s: float | None = None) -> T:
        """Send ``request`` and return the first valid reply; LinkTimeout when none arrives in time."""
        self.open()
        assert self._port is not None
        port = self._port
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        buf = bytearray()
        try:
            port.reset_input_buffer()
            port.write(request)
            port.flush()
            while True:
                chunk = port.read(max(1, port.in_waiting))
                if chunk:
                    buf += chunk
                    reply = extract(buf)
                    if reply is not None:
                        return reply
                if time.monotonic() >= deadline:
                    raise LinkTimeout(f"no valid reply on {self.url} (got {bytes(buf).hex(' ') or 'nothing'})")
        except _PORT_ERRORS as exc:
            self.close()
            raise LinkError(f"I/O error on {self.url}: {exc}") from exc
