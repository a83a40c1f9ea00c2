"""Pure Modbus RTU codec for the shelf-scale weighing transmitters (spec/serial.md).

No I/O here: frames are frozen dataclasses with ``to_bytes``/``from_bytes`` and the CRC is
checked inside, so the link, the client and the simulator all share one definition of the
bytes on the wire and the tests can pin it down with the spec's own examples.

Only what the contract needs is modelled: function 0x03 (read holding registers), its
reply, and the exception reply. The agent never writes to a transmitter, so there is
deliberately no encoder for any write function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from drivers.errors import FrameError

FUNC_READ_HOLDING = 0x03
EXCEPTION_FLAG = 0x80

# Modbus exception codes the transmitters use (spec: other function -> 01, bad range -> 02).
ILLEGAL_FUNCTION = 0x01
ILLEGAL_DATA_ADDRESS = 0x02

# Holding registers of the transmitter.
REG_STATUS = 0x0008
REG_GROSS = 0x0050
REG_NET = 0x0052

STATUS_MOTION = 1 << 5
STATUS_OVERLOAD = 1 << 6
STATUS_DECIMALS_MASK = 0x07

MIN_SLAVE = 1
MAX_SLAVE = 247
MAX_READ_COUNT = 125  # Modbus limit: the byte count of a reply is one byte (<= 250 data bytes).

REQUEST_LEN = 8  # addr, func, reg hi, reg lo, count hi, count lo, crc lo, crc hi
EXCEPTION_LEN = 5  # addr, func|0x80, code, crc lo, crc hi

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def crc16(data: bytes | bytearray | memoryview) -> int:
    """Modbus CRC-16 (reflected polynomial 0xA001, initial 0xFFFF).

    On the wire the result goes low byte first (see :func:`append_crc`).
    """
    crc = 0xFFFF
    for byte in bytes(data):
        crc ^= byte
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc >>= 1
    return crc


def append_crc(body: bytes | bytearray) -> bytes:
    """Return ``body`` followed by its Modbus CRC, low byte first."""
    crc = crc16(body)
    return bytes(body) + bytes((crc & 0xFF, crc >> 8))


def crc_ok(frame: bytes | bytearray | memoryview) -> bool:
    """True when the last two bytes of ``frame`` are the CRC of the bytes before them."""
    if len(frame) < 3:
        return False
    body = bytes(frame[:-2])
    crc = crc16(body)
    return frame[-2] == (crc & 0xFF) and frame[-1] == (crc >> 8)


def _check_slave(slave: int) -> None:
    if not MIN_SLAVE <= slave <= MAX_SLAVE:
        raise ValueError(f"slave address {slave} outside {MIN_SLAVE}..{MAX_SLAVE}")


def _check_frame(data: bytes, length: int, what: str) -> None:
    """Length and CRC checks shared by every ``from_bytes``."""
    if len(data) != length:
        raise FrameError(f"{what}: expected {length} bytes, got {len(data)}: {data.hex(' ')}")
    if not crc_ok(data):
        raise FrameError(f"{what}: bad CRC in {data.hex(' ')}")


@dataclass(frozen=True)
class ReadHoldingRequest:
    """Function 0x03: read ``count`` holding registers starting at ``register`` of ``slave``."""

    slave: int
    register: int
    count: int

    def __post_init__(self) -> None:
        _check_slave(self.slave)
        if not 0 <= self.register <= 0xFFFF:
            raise ValueError(f"register {self.register:#x} outside 0..0xFFFF")
        if not 1 <= self.count <= MAX_READ_COUNT:
            raise ValueError(f"register count {self.count} outside 1..{MAX_READ_COUNT}")

    @property
    def reply_len(self) -> int:
        """Length of the normal reply: addr, func, byte count, 2*count data bytes, CRC."""
        return 5 + 2 * self.count

    def to_bytes(self) -> bytes:
        return append_crc(
            bytes(
                (
                    self.slave,
                    FUNC_READ_HOLDING,
                    self.register >> 8,
                    self.register & 0xFF,
                    self.count >> 8,
                    self.count & 0xFF,
                )
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> ReadHoldingRequest:
        data = bytes(data)
        _check_frame(data, REQUEST_LEN, "read request")
        if data[1] != FUNC_READ_HOLDING:
            raise FrameError(f"read request: function {data[1]:#04x} is not 0x03")
        try:
            return cls(data[0], (data[2] << 8) | data[3], (data[4] << 8) | data[5])
        except ValueError as exc:
            raise FrameError(f"read request: {exc}") from exc


@dataclass(frozen=True)
class ReadHoldingReply:
    """Normal reply to function 0x03: the 16-bit register values, in register order."""

    slave: int
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_slave(self.slave)
        if not 1 <= len(self.values) <= MAX_READ_COUNT:
            raise ValueError(f"{len(self.values)} register values, expected 1..{MAX_READ_COUNT}")
        for v in self.values:
            if not 0 <= v <= 0xFFFF:
                raise ValueError(f"register value {v} outside 0..0xFFFF")

    def to_bytes(self) -> bytes:
        body = bytearray((self.slave, FUNC_READ_HOLDING, 2 * len(self.values)))
        for v in self.values:
            body += bytes((v >> 8, v & 0xFF))
        return append_crc(body)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> ReadHoldingReply:
        data = bytes(data)
        if len(data) < 3:
            raise FrameError(f"read reply: too short: {data.hex(' ')}")
        _check_frame(data, 5 + data[2], "read reply")
        if data[1] != FUNC_READ_HOLDING:
            raise FrameError(f"read reply: function {data[1]:#04x} is not 0x03")
        if data[2] == 0 or data[2] % 2:
            raise FrameError(f"read reply: byte count {data[2]} is not a positive even number")
        values = tuple((data[i] << 8) | data[i + 1] for i in range(3, 3 + data[2], 2))
        try:
            return cls(data[0], values)
        except ValueError as exc:
            raise FrameError(f"read reply: {exc}") from exc


@dataclass(frozen=True)
class ExceptionReply:
    """Modbus exception reply: ``function`` is the wire byte, i.e. the request's function | 0x80."""

    slave: int
    function: int
    code: int

    def __post_init__(self) -> None:
        _check_slave(self.slave)
        if not 0x80 <= self.function <= 0xFF:
            raise ValueError(f"exception function byte {self.function:#x} must have bit 0x80 set")
        if not 0 <= self.code <= 0xFF:
            raise ValueError(f"exception code {self.code} outside 0..255")

    @property
    def request_function(self) -> int:
        """The function code of the request this exception answers."""
        return self.function & 0x7F

    def to_bytes(self) -> bytes:
        return append_crc(bytes((self.slave, self.function, self.code)))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> ExceptionReply:
        data = bytes(data)
        _check_frame(data, EXCEPTION_LEN, "exception reply")
        try:
            return cls(data[0], data[1], data[2])
        except ValueError as exc:
            raise FrameError(f"exception reply: {exc}") from exc


@dataclass(frozen=True)
class Status:
    """Decoded status register 0x0008."""

    motion: bool
    overload: bool
    decimals: int

    def __post_init__(self) -> None:
        if not 0 <= self.decimals <= STATUS_DECIMALS_MASK:
            raise ValueError(f"decimals {self.decimals} outside 0..7")

    @property
    def division_g(self) -> float:
        """One count of the weight registers, in grams (10^-d)."""
        return 10.0**-self.decimals

    @classmethod
    def from_register(cls, value: int) -> Status:
        """Decode the register; bits other than 5, 6 and 2-0 are ignored (vendor specific)."""
        return cls(
            motion=bool(value & STATUS_MOTION),
            overload=bool(value & STATUS_OVERLOAD),
            decimals=value & STATUS_DECIMALS_MASK,
        )

    def to_register(self) -> int:
        return (
            (STATUS_MOTION if self.motion else 0)
            | (STATUS_OVERLOAD if self.overload else 0)
            | self.decimals
        )


def words_to_int32(high: int, low: int) -> int:
    """Two 16-bit registers, high word first, as a signed 32-bit integer."""
    raw = ((high & 0xFFFF) << 16) | (low & 0xFFFF)
    return raw - (1 << 32) if raw & 0x8000_0000 else raw


def int32_to_words(value: int) -> tuple[int, int]:
    """A signed 32-bit integer as two 16-bit registers, high word first."""
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"{value} does not fit a signed 32-bit register pair")
    raw = value & 0xFFFF_FFFF
    return raw >> 16, raw & 0xFFFF


def decode_weight(high: int, low: int, decimals: int) -> float:
    """Gross/net register pair -> grams. The registers count units of 10^-d gram.

    Divides by an exact integer power of ten so that 132 with d=1 is exactly ``13.2``
    (multiplying by 0.1 would give 13.200000000000001).
    """
    if not 0 <= decimals <= STATUS_DECIMALS_MASK:
        raise ValueError(f"decimals {decimals} outside 0..7")
    divisor: int = 10**decimals
    return words_to_int32(high, low) / divisor


def encode_weight(grams: float, decimals: int) -> tuple[int, int]:
    """Grams -> gross/net register pair (rounded to the nearest count); ValueError if out of range."""
    if not 0 <= decimals <= STATUS_DECIMALS_MASK:
        raise ValueError(f"decimals {decimals} outside 0..7")
    return int32_to_words(round(grams * 10**decimals))


Reply = ReadHoldingReply | ExceptionReply


def reply_extractor(request: ReadHoldingRequest) -> Callable[[bytearray], Reply | None]:
    """Extractor for :meth:`SerialLink.transact` that finds the reply to ``request``.

    Accepts, from the request's slave only, either the normal reply (``addr 03 2*count
    data CRC``) or an exception reply (``addr 83 code CRC``, returned as
    :class:`ExceptionReply` so the client can raise). Bytes that cannot start such a
    reply are deleted from the front of the buffer (resync: garbage, a stale frame, a
    frame from another slave, a bad CRC), the returned frame is removed too, and ``None``
    means "need more bytes".

    A candidate is only dropped once enough bytes are there to prove it wrong, and a
    garbage candidate that starts before the real reply always ends before the real
    reply's end (both have the same fixed length), so the real reply is never missed.
    """
    slave = request.slave
    normal_len = request.reply_len
    byte_count = 2 * request.count
    exception_func = FUNC_READ_HOLDING | EXCEPTION_FLAG

    def extract(buf: bytearray) -> Reply | None:
        while buf:
            if buf[0] != slave:
                del buf[0]
                continue
            if len(buf) < 2:
                return None
            func = buf[1]
            if func == FUNC_READ_HOLDING:
                if len(buf) < 3:
                    return None
                if buf[2] != byte_count:
                    del buf[0]
                    continue
                if len(buf) < normal_len:
                    return None
                frame = bytes(buf[:normal_len])
                if crc_ok(frame):
                    del buf[:normal_len]
                    return ReadHoldingReply.from_bytes(frame)
                del buf[0]
            elif func == exception_func:
                if len(buf) < EXCEPTION_LEN:
                    return None
                frame = bytes(buf[:EXCEPTION_LEN])
                if crc_ok(frame):
                    del buf[:EXCEPTION_LEN]
                    return ExceptionReply.from_bytes(frame)
                del buf[0]
            else:
                del buf[0]
        return None

    return extract
