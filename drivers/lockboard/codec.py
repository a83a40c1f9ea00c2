"""Pure codec of the "8A/80" RS-485 lock board (spec/serial.md): frames, BCC, reply extraction.

No I/O here, so the exact bytes of the spec can be tested in microseconds and the same code
serves the client (building requests, extracting replies) and the simulator (parsing requests,
building replies).

Frames (every one ends with BCC = XOR of all preceding bytes)::

    unlock      8A A L 11 BCC   ->  8A A L S BCC
    query one   80 A L 33 BCC   ->  80 A L S BCC
    query all   80 A 00 33 BCC  ->  80 A B3 B2 B1 33 BCC
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce
from typing import overload

from drivers.errors import DriverError, FrameError

HEADER_UNLOCK = 0x8A
HEADER_QUERY = 0x80
CMD_UNLOCK = 0x11
CMD_QUERY = 0x33
STATUS_SET = 0x11
STATUS_CLEAR = 0x00
MAX_LOCKS = 24
REQUEST_LEN = 5
LOCK_REPLY_LEN = 5
ALL_REPLY_LEN = 7


class UnlockFailed(DriverError):
    """An unlock could not be confirmed: no reply to it, even after checking the lock and one re-send.

    The door's state is unknown; the caller must not assume it is shut nor open.
    """


def bcc(data: bytes | bytearray) -> int:
    """XOR of all bytes: the board's block check character (0 for no bytes)."""
    return reduce(lambda acc, b: acc ^ b, data, 0)


def _check_byte(name: str, value: int, low: int = 0, high: int = 0xFF) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")


def _with_bcc(body: bytes) -> bytes:
    return body + bytes([bcc(body)])


def _checked_frame(data: bytes | bytearray, length: int, what: str) -> bytes:
    """Length and BCC checks shared by every from_bytes."""
    data = bytes(data)
    if len(data) != length:
        raise FrameError(f"{what}: expected {length} bytes, got {len(data)}: {data.hex(' ')}")
    if bcc(data[:-1]) != data[-1]:
        raise FrameError(f"{what}: bad BCC {data[-1]:02x} (expected {bcc(data[:-1]):02x}): {data.hex(' ')}")
    return data


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class UnlockRequest:
    """Pulse-unlock ``lock`` of board ``address``.

    Any byte is encodable (lock 0 or > 24 are legal on the wire, the board just does not
    answer them), so tests can send what a real board must ignore.
    """

    address: int
    lock: int

    def __post_init__(self) -> None:
        _check_byte("address", self.address)
        _check_byte("lock", self.lock)

    def to_bytes(self) -> bytes:
        return _with_bcc(bytes([HEADER_UNLOCK, self.address, self.lock, CMD_UNLOCK]))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> UnlockRequest:
        frame = _checked_frame(data, REQUEST_LEN, "unlock request")
        if frame[0] != HEADER_UNLOCK or frame[3] != CMD_UNLOCK:
            raise FrameError(f"not an unlock request: {frame.hex(' ')}")
        return cls(frame[1], frame[2])


@dataclass(frozen=True)
class QueryRequest:
    """Query the feedback of one lock; lock 0 is not allowed here (that is QueryAllRequest)."""

    address: int
    lock: int

    def __post_init__(self) -> None:
        _check_byte("address", self.address)
        _check_byte("lock", self.lock, 1)

    def to_bytes(self) -> bytes:
        return _with_bcc(bytes([HEADER_QUERY, self.address, self.lock, CMD_QUERY]))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> QueryRequest:
        frame = _checked_frame(data, REQUEST_LEN, "query request")
        if frame[0] != HEADER_QUERY or frame[3] != CMD_QUERY or frame[2] == 0:
            raise FrameError(f"not a single-lock query request: {frame.hex(' ')}")
        return cls(frame[1], frame[2])


@dataclass(frozen=True)
class QueryAllRequest:
    """Query the feedback of all 24 locks of a board in one frame (``80 A 00 33 BCC``)."""

    address: int

    def __post_init__(self) -> None:
        _check_byte("address", self.address)

    def to_bytes(self) -> bytes:
        return _with_bcc(bytes([HEADER_QUERY, self.address, 0x00, CMD_QUERY]))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> QueryAllRequest:
        frame = _checked_frame(data, REQUEST_LEN, "query-all request")
        if frame[0] != HEADER_QUERY or frame[3] != CMD_QUERY or frame[2] != 0:
            raise FrameError(f"not a query-all request: {frame.hex(' ')}")
        return cls(frame[1])


Request = UnlockRequest | QueryRequest | QueryAllRequest


def parse_request(data: bytes | bytearray) -> Request:
    """Decode any 5-byte request frame (what the board side needs); FrameError if it is none."""
    frame = _checked_frame(data, REQUEST_LEN, "request")
    if frame[0] == HEADER_UNLOCK:
        return UnlockRequest.from_bytes(frame)
    if frame[0] == HEADER_QUERY:
        return QueryAllRequest.from_bytes(frame) if frame[2] == 0 else QueryRequest.from_bytes(frame)
    raise FrameError(f"unknown request header {frame[0]:02x}: {frame.hex(' ')}")


# ---------------------------------------------------------------- replies


@dataclass(frozen=True)
class LockReply:
    """Reply to an unlock (header 8A) or a single query (header 80): the lock's raw feedback ``S``.

    ``status_byte`` is the raw wire value (00 or 11); its meaning depends on the board's
    ``feedback_open`` polarity, which the client applies, not the codec.
    """

    header: int
    address: int
    lock: int
    status_byte: int

    def __post_init__(self) -> None:
        if self.header not in (HEADER_UNLOCK, HEADER_QUERY):
            raise ValueError(f"header must be 8a or 80, got {self.header!r}")
        _check_byte("address", self.address)
        _check_byte("lock", self.lock, 1)
        if self.status_byte not in (STATUS_SET, STATUS_CLEAR):
            raise ValueError(f"status byte must be 00 or 11, got {self.status_byte!r}")

    @property
    def raw_set(self) -> bool:
        """True when S = 11 (feedback contact open with the default polarity)."""
        return self.status_byte == STATUS_SET

    def to_bytes(self) -> bytes:
        return _with_bcc(bytes([self.header, self.address, self.lock, self.status_byte]))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> LockReply:
        frame = _checked_frame(data, LOCK_REPLY_LEN, "lock reply")
        try:
            return cls(frame[0], frame[1], frame[2], frame[3])
        except ValueError as exc:
            raise FrameError(f"invalid lock reply {frame.hex(' ')}: {exc}") from exc


@dataclass(frozen=True)
class AllReply:
    """Reply to query-all: B1 = locks 1-8, B2 = 9-16, B3 = 17-24 (bit 0 = lowest lock).

    On the wire the order is ``80 A B3 B2 B1 33 BCC`` (B3 first).
    """

    address: int
    b1: int
    b2: int
    b3: int

    def __post_init__(self) -> None:
        _check_byte("address", self.address)
        _check_byte("b1", self.b1)
        _check_byte("b2", self.b2)
        _check_byte("b3", self.b3)

    def to_bytes(self) -> bytes:
        return _with_bcc(bytes([HEADER_QUERY, self.address, self.b3, self.b2, self.b1, CMD_QUERY]))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> AllReply:
        frame = _checked_frame(data, ALL_REPLY_LEN, "query-all reply")
        if frame[0] != HEADER_QUERY or frame[5] != CMD_QUERY:
            raise FrameError(f"not a query-all reply: {frame.hex(' ')}")
        return cls(address=frame[1], b3=frame[2], b2=frame[3], b1=frame[4])

    def raw_bits(self) -> dict[int, bool]:
        """{lock: bit set} for locks 1..24, before applying the feedback polarity."""
        return all_reply_bits(self)

    @classmethod
    def from_raw_bits(cls, address: int, bits: Mapping[int, bool]) -> AllReply:
        """Build a reply from {lock: bit set}; locks not given are clear (used by the simulator)."""
        value = 0
        for lock, is_set in bits.items():
            _check_byte("lock", lock, 1, MAX_LOCKS)
            if is_set:
                value |= 1 << (lock - 1)
        return cls(address, value & 0xFF, (value >> 8) & 0xFF, (value >> 16) & 0xFF)


def all_reply_bits(reply: AllReply) -> dict[int, bool]:
    """{lock: raw bit set} for locks 1..24 of a query-all reply."""
    value = reply.b1 | (reply.b2 << 8) | (reply.b3 << 16)
    return {lock: bool(value >> (lock - 1) & 1) for lock in range(1, MAX_LOCKS + 1)}


Reply = LockReply | AllReply


# ---------------------------------------------------------------- extraction (resync)


@overload
def reply_extractor(request: QueryAllRequest) -> Callable[[bytearray], AllReply | None]: ...


@overload
def reply_extractor(request: UnlockRequest | QueryRequest) -> Callable[[bytearray], LockReply | None]: ...


def reply_extractor(request: Request) -> Callable[[bytearray], Reply | None]:
    """Build the ``extract(buffer)`` for SerialLink.transact that finds the reply to ``request``.

    Garbage, stale frames and replies of other boards or locks are deleted from the front of
    the buffer (one byte at a time, so a real reply hidden behind a false start is still
    found); returns None while the reply is incomplete. A reply must start with the request's
    header, echo its address (and lock), have the right length, valid BCC and S 00/11 (or the
    33 trailer for query-all). Note: the echo of a query request is rejected (S = 33), but the
    echo of an unlock request is byte-identical to an "open" unlock reply.
    """
    if isinstance(request, QueryAllRequest):
        header, length = HEADER_QUERY, ALL_REPLY_LEN
        lock: int | None = None
    elif isinstance(request, UnlockRequest):
        header, length, lock = HEADER_UNLOCK, LOCK_REPLY_LEN, request.lock
    elif isinstance(request, QueryRequest):
        header, length, lock = HEADER_QUERY, LOCK_REPLY_LEN, request.lock
    else:
        raise TypeError(f"not a lock board request: {request!r}")
    address = request.address

    def prefix_ok(buf: bytearray) -> bool:
        """Whether the bytes present at the front could still start the expected reply."""
        n = len(buf)
        if buf[0] != header or (n > 1 and buf[1] != address):
            return False
        if lock is not None:
            return (n < 3 or buf[2] == lock) and (n < 4 or buf[3] in (STATUS_SET, STATUS_CLEAR))
        return n < 6 or buf[5] == CMD_QUERY

    def extract(buf: bytearray) -> Reply | None:
        while buf:
            if not prefix_ok(buf):
                del buf[0]
                continue
            if len(buf) < length:
                return None
            try:
                reply: Reply = (
                    AllReply.from_bytes(buf[:length]) if lock is None else LockReply.from_bytes(buf[:length])
                )
            except FrameError:
                del buf[0]
                continue
            del buf[:length]
            return reply
        return None

    return extract
