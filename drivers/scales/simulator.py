"""Simulated shelf-scale weighing transmitters on a pty, answering exactly like spec/serial.md.

Product code, not test scaffolding: the demo and the tests drive the agent against it, so
it must behave like the real bus (and like any other simulator written from the spec):

- function 0x03 reads of status 0x0008 (count 1) and of the weight registers
  0x0050..0x0053 that do not split a 32-bit value (0x0050/2, 0x0050/4, 0x0052/2) are
  answered; any other register range gets exception 02, any other function code
  exception 01;
- a frame with a bad CRC, or for an address that is not on the bus, gets no reply;
- garbage in front of a request is skipped (resync), and an incomplete frame is dropped
  after a few character times of silence, like a real Modbus RTU slave does;
- net weight equals gross (the transmitter holds no tare: zeroing is the agent's job);
- readings jitter uniformly by less than one division; with the motion bit on they
  wander by several divisions.

Thread safety: every control method may be called from any thread while the reader
thread answers requests; one lock guards the simulated state.

``python -m drivers.scales.simulator`` runs transmitters 1..4 and prints the pty path.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from drivers.ptydevice import PtyDevice, pty_symlink
from drivers.scales.codec import (
    EXCEPTION_FLAG,
    FUNC_READ_HOLDING,
    ILLEGAL_DATA_ADDRESS,
    ILLEGAL_FUNCTION,
    INT32_MAX,
    INT32_MIN,
    MAX_SLAVE,
    MIN_SLAVE,
    REG_GROSS,
    REG_NET,
    REG_STATUS,
    ExceptionReply,
    ReadHoldingReply,
    Status,
    crc_ok,
    int32_to_words,
)

log = logging.getLogger(__name__)

# (start register, count) ranges a transmitter answers; everything else is exception 02.
ANSWERED_RANGES = frozenset({(REG_STATUS, 1), (REG_GROSS, 2), (REG_GROSS, 4), (REG_NET, 2)})

# With the motion bit on, readings wander by up to this many divisions either way.
MOTION_WANDER_DIVISIONS = 5.0

# Minimum silence that ends an incomplete frame (Modbus RTU: 3.5 character times). A pty
# has no line timing, so a floor keeps a frame written in two chunks from being split.
MIN_FRAME_GAP_S = 0.02

_MAX_FRAME = 256  # Modbus RTU frames are at most 256 bytes


@dataclass(frozen=True)
class ReceivedFrame:
    """A request frame (valid CRC) the simulator received, to whoever it was addressed."""

    t: float
    frame: bytes

    @property
    def slave(self) -> int:
        return self.frame[0]

    @property
    def function(self) -> int:
        return self.frame[1]


@dataclass
class _Transmitter:
    grams: float
    decimals: int
    motion: bool = False
    overload: bool = False


def _request_length(buf: bytearray) -> int | None:
    """Length of the request frame starting at ``buf[0]``, or None when unknown (yet).

    Known lengths for the standard public function codes; for others the caller looks
    for the shortest prefix with a valid CRC.
    """
    func = buf[1]
    if func in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06):
        return 8
    if func in (0x07, 0x0B, 0x0C, 0x11):
        return 4
    if func in (0x0F, 0x10):
        return 9 + buf[6] if len(buf) >= 7 else None
    return None


class ScaleSimulator(PtyDevice):
    """Modbus RTU weighing transmitters behind one pty, one per configured slave address."""

    def __init__(
        self,
        slaves: dict[int, float],
        decimals: int = 1,
        noise_divisions: float = 0.4,
        clock: Callable[[], float] = time.monotonic,
        byte_time_s: float = 0.0,
        seed: int | None = None,
    ) -> None:
        """Transmitters at the addresses in ``slaves`` with those initial weights (grams).

        ``decimals`` is every transmitter's initial resolution, ``noise_divisions`` the
        amplitude of the uniform jitter added before rounding to the division grid (below 1,
        so quiet readings differ by at most one division at the default 0.4),
        ``clock`` timestamps the received log, ``byte_time_s`` > 0 sends replies one byte
        at a time at that pace (line speed), and ``seed`` makes the jitter reproducible.
        """
        if not 0 <= decimals <= 7:
            raise ValueError(f"decimals {decimals} outside 0..7")
        if not 0 <= noise_divisions < 1:
            raise ValueError(f"noise_divisions must be in [0, 1) (jitter below one division), got {noise_divisions}")
        super().__init__("scale-simulator", byte_time_s)
        for slave in slaves:
            self._check_slave(slave)
        self.decimals = decimals
        self.noise_divisions = noise_divisions
        self.frame_gap_s = max(MIN_FRAME_GAP_S, 3.5 * byte_time_s)
        self.silence_s = self.frame_gap_s
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._received_cond = threading.Condition(self._lock)
        self._tx: dict[int, _Transmitter] = {s: _Transmitter(float(g), decimals) for s, g in slaves.items()}
        self._silent = False
        self._garbage = bytearray()
        self._received: list[ReceivedFrame] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ScaleSimulator:
        super().start()
        log.info("scale simulator on %s with slaves %s", self.port, sorted(self._tx))
        return self

    # ------------------------------------------------------------------ controls

    @staticmethod
    def _check_slave(slave: int) -> None:
        if not MIN_SLAVE <= slave <= MAX_SLAVE:
            raise ValueError(f"slave address {slave} outside {MIN_SLAVE}..{MAX_SLAVE}")

    def set_weight(self, slave: int, grams: float) -> None:
        """Put ``grams`` on the load cell (the true weight; readings add jitter)."""
        with self._lock:
            self._tx[slave].grams = float(grams)

    def add_weight(self, slave: int, delta_g: float) -> None:
        """Add (or, negative, take away) ``delta_g`` grams: an item put back or taken."""
        with self._lock:
            self._tx[slave].grams += delta_g

    def weight(self, slave: int) -> float:
        """The true weight on the load cell, without jitter."""
        with self._lock:
            return self._tx[slave].grams

    def set_motion(self, slave: int, motion: bool) -> None:
        """Motion bit on/off; while on, readings wander by several divisions."""
        with self._lock:
            self._tx[slave].motion = motion

    def set_overload(self, slave: int, overload: bool) -> None:
        """Overload bit on/off (the weight is still reported)."""
        with self._lock:
            self._tx[slave].overload = overload

    def set_decimals(self, slave: int, decimals: int) -> None:
        """Change a transmitter's number of decimals (its resolution)."""
        if not 0 <= decimals <= 7:
            raise ValueError(f"decimals {decimals} outside 0..7")
        with self._lock:
            self._tx[slave].decimals = decimals

    def remove(self, slave: int) -> None:
        """Take a transmitter off the bus (power or cable lost): it no longer answers."""
        with self._lock:
            self._tx.pop(slave, None)

    def add(self, slave: int, grams: float) -> None:
        """Put a transmitter (back) on the bus with ``grams`` on its load cell."""
        self._check_slave(slave)
        with self._lock:
            self._tx[slave] = _Transmitter(float(grams), self.decimals)

    def slaves(self) -> list[int]:
        """Addresses of the transmitters currently on the bus."""
        with self._lock:
            return sorted(self._tx)

    def set_silent(self, silent: bool) -> None:
        """Whole bus silent (e.g. A/B wires swapped): requests are logged, never answered."""
        with self._lock:
            self._silent = silent

    def inject_garbage(self, data: bytes) -> None:
        """Send ``data`` just before the next reply (line noise, a stale frame).

        Queued rather than written at once because the agent flushes its input buffer
        before each request: garbage must arrive after the request to be seen at all.
        """
        with self._lock:
            self._garbage += data

    @property
    def received(self) -> list[ReceivedFrame]:
        """Every request frame with a valid CRC received so far, with its clock time."""
        with self._lock:
            return list(self._received)

    def clear_received(self) -> None:
        with self._lock:
            self._received.clear()

    def wait_received(self, count: int, timeout_s: float) -> bool:
        """Wait until at least ``count`` frames have been received; False on timeout."""
        with self._received_cond:
            return self._received_cond.wait_for(lambda: len(self._received) >= count, timeout_s)

    # ------------------------------------------------------------------ the transmitter

    def _reading_words(self, tx: _Transmitter) -> tuple[int, int]:
        """One noisy reading of ``tx`` as a register pair (called under the lock)."""
        counts = tx.grams * 10**tx.decimals
        counts += self._rng.uniform(-self.noise_divisions, self.noise_divisions)
        if tx.motion:
            counts += self._rng.uniform(-MOTION_WANDER_DIVISIONS, MOTION_WANDER_DIVISIONS)
        raw = min(INT32_MAX, max(INT32_MIN, round(counts)))
        return int32_to_words(raw)

    def _answer(self, frame: bytes) -> bytes | None:
        """The reply to a CRC-valid ``frame``, or None for no reply (called under the lock)."""
        slave, func = frame[0], frame[1]
        tx = self._tx.get(slave)
        if self._silent or tx is None:
            return None
        if func != FUNC_READ_HOLDING:
            return ExceptionReply(slave, (func | EXCEPTION_FLAG) & 0xFF, ILLEGAL_FUNCTION).to_bytes()
        register = (frame[2] << 8) | frame[3]
        count = (frame[4] << 8) | frame[5]
        if (register, count) not in ANSWERED_RANGES:
            return ExceptionReply(slave, FUNC_READ_HOLDING | EXCEPTION_FLAG, ILLEGAL_DATA_ADDRESS).to_bytes()
        if register == REG_STATUS:
            values: tuple[int, ...] = (Status(tx.motion, tx.overload, tx.decimals).to_register(),)
        else:
            words = self._reading_words(tx)  # one sample: gross and net read together agree
            values = (words + words)[: count] if register == REG_GROSS else words
        return ReadHoldingReply(slave, values).to_bytes()

    def _take_frames(self, buf: bytearray, flush_incomplete: bool) -> list[bytes]:
        """Split complete request frames off ``buf``, skipping bytes that cannot start one.

        With ``flush_incomplete`` (silence on the line), a prefix that is still waiting for
        more bytes is given up on, byte by byte, so a request hidden behind garbage that
        claimed a long length is still found.
        """
        frames: list[bytes] = []
        while buf:
            if len(buf) >= 4:
                length = _request_length(buf)
                if length is None and buf[1] not in (0x0F, 0x10):
                    # Unknown function: the shortest prefix with a valid CRC is the frame.
                    length = next(
                        (n for n in range(4, min(len(buf), _MAX_FRAME) + 1) if crc_ok(buf[:n])), None
                    )
                    if length is None and len(buf) >= _MAX_FRAME:
                        del buf[0]
                        continue
                if length is not None and len(buf) >= length:
                    if crc_ok(buf[:length]):
                        frames.append(bytes(buf[:length]))
                        del buf[:length]
                    else:
                        del buf[0]
                    continue
            if not flush_incomplete:
                break
            del buf[0]
        return frames

    def _handle(self, frame: bytes) -> None:
        with self._received_cond:
            self._received.append(ReceivedFrame(self._clock(), frame))
            self._received_cond.notify_all()
            reply = self._answer(frame)
            if reply is None:
                return
            out = bytes(self._garbage) + reply
            self._garbage.clear()
        log.debug("scale simulator: %s -> %s", frame.hex(" "), out.hex(" "))
        self._write(out)

    def _on_bytes(self, buf: bytearray) -> None:
        for frame in self._take_frames(buf, flush_incomplete=False):
            self._handle(frame)

    def _on_silence(self, buf: bytearray) -> None:
        # Silence after an incomplete frame: a real RTU slave drops it.
        for frame in self._take_frames(buf, flush_incomplete=True):
            self._handle(frame)


# ---------------------------------------------------------------------- command line

_HELP = """commands:
  set S G         put G grams on slave S        add S D      add D grams (negative: take)
  motion S on|off motion bit                    overload S on|off
  remove S        take slave S off the bus      plug S G     put it back with G grams
  silent on|off   whole bus silent              garbage HEX  bytes before the next reply
  show            weights and flags             quit"""


def _command(sim: ScaleSimulator, line: str) -> str | None:
    """Apply one interactive command; returns text to print (None: quit)."""
    parts = line.split()
    if not parts:
        return ""
    cmd, args = parts[0].lower(), parts[1:]
    on = {"on": True, "off": False, "1": True, "0": False}
    try:
        if cmd in ("quit", "exit"):
            return None
        if cmd == "set":
            sim.set_weight(int(args[0]), float(args[1]))
        elif cmd == "add":
            sim.add_weight(int(args[0]), float(args[1]))
        elif cmd == "motion":
            sim.set_motion(int(args[0]), on[args[1]])
        elif cmd == "overload":
            sim.set_overload(int(args[0]), on[args[1]])
        elif cmd == "remove":
            sim.remove(int(args[0]))
        elif cmd == "plug":
            sim.add(int(args[0]), float(args[1]))
        elif cmd == "silent":
            sim.set_silent(on[args[0]])
        elif cmd == "garbage":
            sim.inject_garbage(bytes.fromhex("".join(args)))
        elif cmd == "show":
            return "\n".join(f"slave {s}: {sim.weight(s):.3f} g" for s in sim.slaves())
        else:
            return _HELP
    except (IndexError, KeyError, ValueError) as exc:
        return f"error: {exc!r}\n{_HELP}"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated Modbus RTU weighing transmitters on a pty.")
    parser.add_argument("--slaves", default="1,2,3,4", help="comma-separated slave addresses (default 1,2,3,4)")
    parser.add_argument("--grams", type=float, default=0.0, help="initial weight on every load cell")
    parser.add_argument("--decimals", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.4, help="jitter in divisions, below 1")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--link", help="also make this path a symlink to the pty (for a fixed config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr)

    slaves = {int(s): args.grams for s in args.slaves.split(",") if s.strip()}
    sim = ScaleSimulator(slaves, decimals=args.decimals, noise_divisions=args.noise, seed=args.seed)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    sim.start()
    print(sim.port, flush=True)
    link = pty_symlink(sim.port, args.link)
    link.__enter__()
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            print(_HELP, file=sys.stderr, flush=True)
        for line in sys.stdin if sys.stdin is not None else ():
            if done.is_set():
                break
            out = _command(sim, line)
            if out is None:
                done.set()
                break
            if out:
                print(out, file=sys.stderr, flush=True)
        # stdin closed (run in the background): keep serving until SIGTERM / Ctrl-C.
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        link.__exit__(None, None, None)
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
