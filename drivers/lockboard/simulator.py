"""Simulator of one "8A/80" lock board on a pty, answering exactly the bytes of spec/serial.md.

Product code: the demo and the tests drive the real client over a real pty against it, so
the byte-level contract is exercised end to end. Each lock has a latch (released for
``latch_release_s`` after an unlock pulse) and a door; the feedback reads open while the
latch is released or the door is open, as on the real board. Fault controls (silence,
garbage, lost requests or replies) let tests reproduce what goes wrong on RS-485.

Run ``python -m drivers.lockboard.simulator`` to get a board on a pty for manual testing.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from drivers.errors import FrameError
from drivers.lockboard.codec import (
    CMD_QUERY,
    CMD_UNLOCK,
    HEADER_QUERY,
    HEADER_UNLOCK,
    MAX_LOCKS,
    REQUEST_LEN,
    STATUS_CLEAR,
    STATUS_SET,
    AllReply,
    LockReply,
    QueryAllRequest,
    QueryRequest,
    Request,
    UnlockRequest,
    parse_request,
)
from drivers.ptydevice import PtyDevice, pty_symlink

log = logging.getLogger(__name__)

_COMMAND_OF = {HEADER_UNLOCK: CMD_UNLOCK, HEADER_QUERY: CMD_QUERY}


@dataclass
class _Fault:
    """The next ``count`` requests (of ``header``, or any) get no reply; carried out if ``execute``."""

    count: int
    header: int | None
    execute: bool


def take_request_frames(buf: bytearray) -> list[bytes]:
    """Remove and return the complete request frames at the front of ``buf``.

    Bytes that cannot start a request (unknown header or command byte, bad BCC) are skipped
    one at a time, so the board resyncs on the next real frame; an incomplete tail is kept.
    """
    frames: list[bytes] = []
    while buf:
        command = _COMMAND_OF.get(buf[0])
        if command is None or (len(buf) > 3 and buf[3] != command):
            del buf[0]
            continue
        if len(buf) < REQUEST_LEN:
            break
        frame = bytes(buf[:REQUEST_LEN])
        try:
            parse_request(frame)
        except FrameError:
            del buf[0]
            continue
        del buf[:REQUEST_LEN]
        frames.append(frame)
    return frames


class LockBoardSimulator(PtyDevice):
    """One lock board at ``address`` with ``locks`` channels (1..24), served on a pty.

    ``clock`` drives the latch timing; ``byte_time_s`` > 0 emulates line time by writing the
    reply one byte at a time with that gap. ``on_unlock(lock)`` is called from the reader
    thread, outside the simulator's lock, after each executed unlock (the demo's shopper).
    """

    def __init__(
        self,
        address: int = 1,
        locks: int = MAX_LOCKS,
        feedback_open: int = 1,
        latch_release_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        byte_time_s: float = 0.0,
        on_unlock: Callable[[int], object] | None = None,
    ) -> None:
        if not 1 <= address <= 255:
            raise ValueError(f"address must be 1..255, got {address}")
        if not 1 <= locks <= MAX_LOCKS:
            raise ValueError(f"locks must be 1..{MAX_LOCKS}, got {locks}")
        if feedback_open not in (0, 1):
            raise ValueError(f"feedback_open must be 0 or 1, got {feedback_open}")
        if latch_release_s < 0 or byte_time_s < 0:
            raise ValueError("latch_release_s and byte_time_s must be >= 0")
        super().__init__(f"lockboard-sim-{address}", byte_time_s)
        self.address = address
        self.locks = locks
        self.feedback_open = feedback_open
        self.latch_release_s = latch_release_s
        self.on_unlock = on_unlock
        self._clock = clock
        self._cond = threading.Condition()
        self._released_until: dict[int, float] = {lock: -math.inf for lock in range(1, locks + 1)}
        self._door_open: dict[int, bool] = {lock: False for lock in range(1, locks + 1)}
        self._silent = False
        self._garbage = bytearray()
        self._faults: list[_Fault] = []
        self.received: list[tuple[float, bytes]] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> LockBoardSimulator:
        """Open the pty and start answering; ``port`` is then the device to open."""
        super().start()
        log.info("lock board simulator address %d on %s", self.address, self.port)
        return self

    # ------------------------------------------------------------ controls (thread-safe)

    def _check(self, lock: int) -> None:
        if not 1 <= lock <= self.locks:
            raise ValueError(f"lock must be 1..{self.locks}, got {lock}")

    def _released(self, lock: int) -> bool:
        return self._clock() < self._released_until[lock]

    def open_door(self, lock: int) -> bool:
        """A shopper pulls the door: it opens only while the latch is released."""
        self._check(lock)
        with self._cond:
            if self._door_open[lock] or self._released(lock):
                self._door_open[lock] = True
                return True
            return False

    def force_open(self, lock: int) -> None:
        """The door is opened regardless of the latch (a forced door, an uncommanded open)."""
        self._check(lock)
        with self._cond:
            self._door_open[lock] = True

    def close_door(self, lock: int) -> None:
        """The door is pushed shut; the latch engages by itself."""
        self._check(lock)
        with self._cond:
            self._door_open[lock] = False
            self._released_until[lock] = -math.inf

    def is_open(self, lock: int) -> bool:
        """Whether the door itself is open (not the feedback)."""
        self._check(lock)
        with self._cond:
            return self._door_open[lock]

    def is_released(self, lock: int) -> bool:
        """Whether the latch is still released from the last unlock pulse."""
        self._check(lock)
        with self._cond:
            return self._released(lock)

    def reads_open(self, lock: int) -> bool:
        """The feedback the board reports (polarity-free): latch released or door open."""
        self._check(lock)
        with self._cond:
            return self._reads_open(lock)

    def set_silent(self, silent: bool) -> None:
        """A dead board: requests are still logged in ``received`` but neither executed nor answered."""
        with self._cond:
            self._silent = silent

    def inject_garbage(self, data: bytes) -> None:
        """Write ``data`` on the line just before the next reply (noise, a stale frame)."""
        with self._cond:
            self._garbage += data

    def fail_next(self, count: int = 1, *, header: int | None = None, execute: bool = False) -> None:
        """The next ``count`` requests (only those with ``header``, if given) get no reply.

        ``execute=False``: the request was lost on the way to the board (nothing happens);
        ``execute=True``: the board carried it out but its reply was lost on the way back.
        """
        with self._cond:
            self._faults.append(_Fault(count, header, execute))

    def wait_for_frame(
        self, predicate: Callable[[bytes], bool], timeout: float, since: int = 0
    ) -> tuple[float, bytes] | None:
        """First (time, frame) in ``received[since:]`` matching ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        checked = since
        with self._cond:
            while True:
                for entry in self.received[checked:]:
                    if predicate(entry[1]):
                        return entry
                checked = max(checked, len(self.received))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    # ------------------------------------------------------------ board behaviour

    def _reads_open(self, lock: int) -> bool:
        return self._door_open[lock] or self._released(lock)

    def _raw_set(self, lock: int) -> bool:
        """Wire bit of a lock under the board's polarity; absent channels read shut."""
        is_open = lock <= self.locks and self._reads_open(lock)
        return is_open == bool(self.feedback_open)

    def _status(self, lock: int) -> int:
        return STATUS_SET if self._raw_set(lock) else STATUS_CLEAR

    def _execute(self, request: Request) -> bytes | None:
        """Carry out a request (caller holds the lock); the reply bytes, or None when not answered."""
        if request.address != self.address:
            return None
        if isinstance(request, QueryAllRequest):
            bits = {lock: self._raw_set(lock) for lock in range(1, MAX_LOCKS + 1)}
            return AllReply.from_raw_bits(self.address, bits).to_bytes()
        if not 1 <= request.lock <= self.locks:
            return None
        if isinstance(request, UnlockRequest):
            self._released_until[request.lock] = self._clock() + self.latch_release_s
            return LockReply(HEADER_UNLOCK, self.address, request.lock, self._status(request.lock)).to_bytes()
        assert isinstance(request, QueryRequest)
        return LockReply(HEADER_QUERY, self.address, request.lock, self._status(request.lock)).to_bytes()

    def _take_fault(self, frame: bytes) -> _Fault | None:
        for fault in self._faults:
            if fault.header is None or fault.header == frame[0]:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _handle(self, frame: bytes) -> None:
        request = parse_request(frame)
        unlocked: int | None = None
        out = b""
        with self._cond:
            self.received.append((time.monotonic(), frame))
            self._cond.notify_all()
            if self._silent:
                log.debug("silent: ignoring %s", frame.hex(" "))
                return
            fault = self._take_fault(frame)
            if fault is not None and not fault.execute:
                log.debug("fault: request %s lost", frame.hex(" "))
                return
            reply = self._execute(request)
            if reply is not None and isinstance(request, UnlockRequest):
                unlocked = request.lock
            if fault is not None:
                log.debug("fault: reply %s to %s lost", reply.hex(" ") if reply else None, frame.hex(" "))
                reply = None
            if reply is not None:
                out = bytes(self._garbage) + reply
                self._garbage.clear()
        if out:
            log.debug("request %s -> %s", frame.hex(" "), out.hex(" "))
            self._write(out)
        if unlocked is not None and self.on_unlock is not None:
            try:
                self.on_unlock(unlocked)
            except Exception:  # a demo callback must not kill the board
                log.exception("on_unlock callback failed for lock %d", unlocked)

    def _on_bytes(self, buf: bytearray) -> None:
        for frame in take_request_frames(buf):
            self._handle(frame)


def main(argv: list[str] | None = None) -> None:
    """Start a simulated board and print its pty path until Ctrl-C."""
    parser = argparse.ArgumentParser(description="8A/80 lock board simulator on a pty")
    parser.add_argument("--address", type=int, default=1)
    parser.add_argument("--locks", type=int, default=MAX_LOCKS)
    parser.add_argument("--feedback-open", type=int, choices=(0, 1), default=1)
    parser.add_argument("--latch-release-s", type=float, default=0.5)
    parser.add_argument("--shopper", action="store_true", help="open each door right after its unlock")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every frame")
    parser.add_argument("--link", help="also make this path a symlink to the pty (for a fixed config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    sim = LockBoardSimulator(args.address, args.locks, args.feedback_open, args.latch_release_s)
    if args.shopper:
        sim.on_unlock = sim.open_door  # a shopper pulls every door as soon as it is unlocked
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # explicit: a background job inherits SIGINT ignored
        signal.signal(signum, lambda *_: done.set())
    with sim, pty_symlink(sim.port, args.link):
        print(sim.port, flush=True)
        while not done.wait(1.0):
            pass
    log.info("lock board simulator stopped")


if __name__ == "__main__":
    main()
