"""Device owner threads: one thread owns each serial bus and talks to the core via its inbox.

The lock board thread polls "query all" and executes unlock requests between polls; the scale
thread reads every lane's transmitter in turn and judges stability. Both turn repeated
failures into one fault event and a later good answer into one recovery event, and both
survive any error (a missing adapter is retried, never fatal).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.events import (
    ChannelState,
    DeviceFault,
    DeviceKind,
    DeviceRecovered,
    DoorFeedback,
    LockProbed,
    ScaleCycle,
    UnlockDone,
)
from drivers.errors import DriverError
from drivers.lockboard.client import LockBoardClient
from drivers.scales.client import ScaleClient
from drivers.scales.stability import StabilityWindow
from drivers.serial_link import SerialLink

log = logging.getLogger(__name__)


class _FaultCounter:
    """Turns a run of failures into one fault and the next success into one recovery."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.misses = 0
        self.faulted = False

    def fail(self) -> bool:
        self.misses += 1
        if not self.faulted and self.misses >= self.threshold:
            self.faulted = True
            return True
        return False

    def ok(self) -> bool:
        self.misses = 0
        if self.faulted:
            self.faulted = False
            return True
        return False


_PROBE = (0, "")


class LockboardThread(threading.Thread):
    def __init__(self, port: str, baudrate: int, address: int, feedback_open: int, reply_timeout_s: float,
                 poll_interval_s: float, fault_after: int, post: Callable[[Any], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="lockboard", daemon=True)
        self.link = SerialLink(port, baudrate, reply_timeout_s)
        self.client = LockBoardClient(self.link, address, feedback_open)
        self.address = address
        self.poll_interval_s = poll_interval_s
        self.post = post
        self.clock = clock
        self.faults = _FaultCounter(fault_after)
        self._requests: queue.Queue[tuple[int, str] | None] = queue.Queue()   # (0, "") asks for a probe
        self._stopping = threading.Event()

    def unlock(self, lock: int, token: str) -> None:
        """Queue an unlock; the result comes back to the core as UnlockDone."""
        self._requests.put((lock, token))

    def probe(self) -> None:
        """Query the board now, between polls; the answer comes back as LockProbed (and, if the
        board was faulted and answers, DeviceRecovered first)."""
        self._requests.put(_PROBE)

    def stop(self) -> None:
        self._stopping.set()
        self._requests.put(None)
        self.join(2.0)
        self.link.close()

    def run(self) -> None:
        next_poll = self.clock()
        while not self._stopping.is_set():
            try:
                req = self._requests.get(timeout=max(0.0, next_poll - self.clock()))
            except queue.Empty:
                req = None
            if self._stopping.is_set():
                break
            try:
                if req == _PROBE:
                    self.post(LockProbed(self._poll(), self.clock()))
                elif req is not None:
                    self._unlock(*req)
                if self.clock() >= next_poll:
                    next_poll = self.clock() + self.poll_interval_s
                    self._poll()
            except Exception:  # noqa: BLE001 - the bus owner must survive anything
                log.exception("lock board thread error")

    def _unlock(self, lock: int, token: str) -> None:
        try:
            self.client.unlock(lock)
        except DriverError as exc:
            log.error("unlock of lock %d not confirmed: %s", lock, exc)
            self.post(UnlockDone(lock, token, False, self.clock(), str(exc)))
            return
        log.info("lock %d unlocked", lock)
        self.post(UnlockDone(lock, token, True, self.clock()))

    def _poll(self) -> bool:
        try:
            states = self.client.query_all()
        except DriverError as exc:
            if self.faults.fail():
                self.post(DeviceFault(DeviceKind.LOCKBOARD, self.address, str(exc)))
            if self.faults.faulted:
                self.post(DoorFeedback(None, self.clock()))
            return False
        if self.faults.ok():
            self.post(DeviceRecovered(DeviceKind.LOCKBOARD, self.address))
        self.post(DoorFeedback(states, self.clock()))
        return True


class ScaleThread(threading.Thread):
    def __init__(self, port: str, baudrate: int, channels: list[int], settle_s: float, reply_timeout_s: float,
                 fault_after: int, post: Callable[[Any], None], cycle_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="scales", daemon=True)
        self.link = SerialLink(port, baudrate, reply_timeout_s)
        self.client = ScaleClient(self.link)
        self.channels = channels
        self.post = post
        self.cycle_s = cycle_s
        self.clock = clock
        self.windows = {ch: StabilityWindow(settle_s) for ch in channels}
        self.faults = {ch: _FaultCounter(fault_after) for ch in channels}
        self.last: dict[int, float | None] = {ch: None for ch in channels}
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.join(2.0)
        self.link.close()

    def run(self) -> None:
        while not self._stopping.is_set():
            started = self.clock()
            try:
                self._cycle()
            except Exception:  # noqa: BLE001
                log.exception("scale thread error")
            self._stopping.wait(max(0.0, self.cycle_s - (self.clock() - started)))

    def _cycle(self) -> None:
        out: dict[int, ChannelState] = {}
        for ch in self.channels:
            counter = self.faults[ch]
            try:
                reading = self.client.read(ch)
                if reading.overload:
                    raise DriverError("overload")
            except DriverError as exc:
                self.windows[ch].reset()
                if counter.fail():
                    self.post(DeviceFault(DeviceKind.SCALE, ch, str(exc)))
                if counter.faulted:
                    self.last[ch] = None
                out[ch] = ChannelState(self.last[ch], False)
                continue
            if counter.ok():
                self.post(DeviceRecovered(DeviceKind.SCALE, ch))
            now = self.clock()
            division = reading.division_g if reading.division_g is not None else 10.0 ** -reading.decimals
            self.windows[ch].add(now, reading.gross_g, reading.motion, division)
            self.last[ch] = reading.gross_g
            out[ch] = ChannelState(reading.gross_g, self.windows[ch].is_stable(now))
        self.post(ScaleCycle(out, self.clock()))
