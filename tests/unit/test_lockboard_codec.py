"""Byte-exact tests of the lock board codec against spec/serial.md (pure, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import DriverError, FrameError
from drivers.lockboard.codec import (
    AllReply,
    LockReply,
    QueryAllRequest,
    QueryRequest,
    UnlockFailed,
    UnlockRequest,
    all_reply_bits,
    bcc,
    parse_request,
    reply_extractor,
)
from drivers.lockboard.simulator import take_request_frames

H = bytes.fromhex
byte = st.integers(0, 255)
lock_no = st.integers(1, 255)
status = st.sampled_from([0x00, 0x11])


def feed(extract, data: bytes, chunk: int = 1):
    """Feed ``data`` to ``extract`` ``chunk`` bytes at a time, like the link does; all replies found."""
    buf = bytearray()
    replies = []
    for i in range(0, len(data), chunk):
        buf += data[i : i + chunk]
        reply = extract(buf)
        if reply is not None:
            replies.append(reply)
    return replies, buf


# ------------------------------------------------------------------ spec examples


def test_spec_example_unlock_board1_lock1():
    assert UnlockRequest(1, 1).to_bytes() == H("8A 01 01 11 9B")
    assert UnlockRequest.from_bytes(H("8A 01 01 11 9B")) == UnlockRequest(1, 1)


def test_spec_example_query_all_board1():
    assert QueryAllRequest(1).to_bytes() == H("80 01 00 33 B2")
    assert QueryAllRequest.from_bytes(H("80 01 00 33 B2")) == QueryAllRequest(1)


def test_spec_example_all_shut_reply():
    assert AllReply(1, 0, 0, 0).to_bytes() == H("80 01 00 00 00 33 B2")
    reply = AllReply.from_bytes(H("80 01 00 00 00 33 B2"))
    assert reply == AllReply(1, 0, 0, 0)
    assert reply.raw_bits() == {lock: False for lock in range(1, 25)}


def test_query_one_and_replies_bytes():
    assert QueryRequest(1, 5).to_bytes() == H("80 01 05 33 B7")
    assert LockReply(0x8A, 1, 1, 0x11).to_bytes() == H("8A 01 01 11 9B")
    assert LockReply(0x80, 2, 7, 0x00).to_bytes() == H("80 02 07 00 85")
    assert LockReply.from_bytes(H("80 02 07 00 85")) == LockReply(0x80, 2, 7, 0x00)
    assert LockReply.from_bytes(H("8A 01 01 11 9B")).raw_set is True
    assert LockReply.from_bytes(H("80 02 07 00 85")).raw_set is False


def test_bcc_is_xor_of_all_bytes():
    assert bcc(b"") == 0
    assert bcc(H("8A 01 01 11")) == 0x9B
    assert bcc(H("80 01 00 33")) == 0xB2
    assert bcc(H("80 01 00 00 00 33")) == 0xB2
    assert bcc(bytearray(H("FF 0F"))) == 0xF0


@given(st.binary(max_size=32))
def test_bcc_of_frame_with_its_bcc_is_zero(data):
    assert bcc(data + bytes([bcc(data)])) == 0


# ------------------------------------------------------------------ query-all byte order


def test_all_reply_byte_order_is_b3_b2_b1():
    # lock 2 -> B1 bit1; locks 10, 11 -> B2 bits 1, 2; lock 24 -> B3 bit 7
    reply = AllReply.from_raw_bits(1, {2: True, 10: True, 11: True, 24: True, 5: False})
    assert (reply.b1, reply.b2, reply.b3) == (0x02, 0x06, 0x80)
    body = H("80 01 80 06 02 33")
    assert reply.to_bytes() == body + bytes([bcc(body)])
    bits = all_reply_bits(AllReply.from_bytes(reply.to_bytes()))
    assert [lock for lock, is_set in bits.items() if is_set] == [2, 10, 11, 24]


def test_all_reply_bits_boundaries():
    bits = AllReply(1, b1=0x81, b2=0x81, b3=0x81).raw_bits()
    assert [lock for lock, is_set in bits.items() if is_set] == [1, 8, 9, 16, 17, 24]
    assert sorted(bits) == list(range(1, 25))


@given(st.dictionaries(st.integers(1, 24), st.booleans()), st.integers(1, 255))
def test_raw_bits_round_trip(bits, address):
    reply = AllReply.from_raw_bits(address, bits)
    decoded = AllReply.from_bytes(reply.to_bytes()).raw_bits()
    assert decoded == {lock: bits.get(lock, False) for lock in range(1, 25)}


# ------------------------------------------------------------------ round trips


@given(byte, byte)
def test_unlock_request_round_trip(address, lock):
    frame = UnlockRequest(address, lock).to_bytes()
    assert len(frame) == 5 and frame[0] == 0x8A and frame[3] == 0x11 and bcc(frame) == 0
    assert UnlockRequest.from_bytes(frame) == UnlockRequest(address, lock)
    assert parse_request(frame) == UnlockRequest(address, lock)


@given(byte, lock_no)
def test_query_request_round_trip(address, lock):
    frame = QueryRequest(address, lock).to_bytes()
    assert QueryRequest.from_bytes(frame) == QueryRequest(address, lock)
    assert parse_request(frame) == QueryRequest(address, lock)


@given(byte)
def test_query_all_request_round_trip(address):
    frame = QueryAllRequest(address).to_bytes()
    assert QueryAllRequest.from_bytes(frame) == QueryAllRequest(address)
    assert parse_request(frame) == QueryAllRequest(address)


@given(st.sampled_from([0x8A, 0x80]), byte, lock_no, status)
def test_lock_reply_round_trip(header, address, lock, s):
    reply = LockReply(header, address, lock, s)
    assert LockReply.from_bytes(reply.to_bytes()) == reply


@given(byte, byte, byte, byte)
def test_all_reply_round_trip(address, b1, b2, b3):
    reply = AllReply(address, b1, b2, b3)
    frame = reply.to_bytes()
    assert len(frame) == 7 and frame[:2] == bytes([0x80, address]) and frame[5] == 0x33
    assert frame[2:5] == bytes([b3, b2, b1])
    assert AllReply.from_bytes(frame) == reply


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "cls, data",
    [
        (UnlockRequest, H("8A 01 01 11")),  # short
        (UnlockRequest, H("8A 01 01 11 9B 00")),  # long
        (UnlockRequest, H("8A 01 01 11 9C")),  # bad BCC
        (UnlockRequest, H("80 01 01 33 B3")),  # a query, not an unlock
        (UnlockRequest, H("8A 01 01 22 A8")),  # unknown command byte, valid BCC
        (QueryRequest, H("80 01 00 33 B2")),  # lock 0 is query all
        (QueryRequest, H("8A 01 01 11 9B")),
        (QueryAllRequest, H("80 01 01 33 B3")),
        (QueryAllRequest, H("80 01 00 33 B3")),
        (LockReply, H("80 01 01 00")),
        (LockReply, H("80 01 01 00 81")),  # bad BCC
        (LockReply, H("81 01 01 00 81")),  # bad header (BCC right)
        (LockReply, H("80 01 01 33 B3")),  # S must be 00 or 11 (this is a query's echo)
        (LockReply, H("80 01 00 00 81")),  # lock 0
        (AllReply, H("80 01 00 00 00 33")),
        (AllReply, H("80 01 00 00 00 33 B2 00")),
        (AllReply, H("80 01 00 00 00 33 B3")),
        (AllReply, H("8A 01 00 00 00 33 B8")),  # header
        (AllReply, H("80 01 00 00 00 11 90")),  # trailer must be 33
    ],
)
def test_from_bytes_rejects(cls, data):
    with pytest.raises(FrameError):
        cls.from_bytes(data)


def test_parse_request_rejects_unknown_header():
    with pytest.raises(FrameError):
        parse_request(H("81 01 01 33 B2"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: UnlockRequest(256, 1),
        lambda: UnlockRequest(1, -1),
        lambda: QueryRequest(1, 0),
        lambda: QueryAllRequest(-1),
        lambda: LockReply(0x81, 1, 1, 0x11),
        lambda: LockReply(0x80, 1, 1, 0x01),
        lambda: AllReply(1, 256, 0, 0),
        lambda: AllReply.from_raw_bits(1, {25: True}),
    ],
)
def test_constructors_validate(make):
    with pytest.raises(ValueError):
        make()


def test_unlock_failed_is_a_driver_error():
    assert issubclass(UnlockFailed, DriverError)


# ------------------------------------------------------------------ extractor


def test_extractor_exact_reply():
    extract = reply_extractor(UnlockRequest(1, 1))
    buf = bytearray(H("8A 01 01 11 9B"))
    assert extract(buf) == LockReply(0x8A, 1, 1, 0x11)
    assert buf == b""


def test_extractor_returns_none_while_incomplete_and_keeps_prefix():
    extract = reply_extractor(QueryAllRequest(1))
    buf = bytearray(H("80 01 00 00 00 33"))
    assert extract(buf) is None
    assert buf == H("80 01 00 00 00 33")
    buf += H("B2")
    assert extract(buf) == AllReply(1, 0, 0, 0)


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
def test_extractor_split_arrival(chunk):
    reply = AllReply(1, 0x02, 0x06, 0x80)
    replies, _ = feed(reply_extractor(QueryAllRequest(1)), reply.to_bytes(), chunk)
    assert replies == [reply]


@pytest.mark.parametrize(
    "garbage",
    [
        H("00 FF 13"),
        H("80"),  # a lone header
        H("80 01"),  # a false start with the right header and address
        H("80 01 00 00"),
        H("80 01 00 00 00 33 B3"),  # a whole query-all frame with a bad BCC
        H("80 02 00 00 00 33 B1"),  # a valid reply of another board
        H("80 01 00 33 B2"),  # the echo of the request itself
    ],
)
def test_extractor_resyncs_after_garbage_before_reply(garbage):
    reply = AllReply(1, 0xFF, 0x00, 0x01)
    for chunk in (1, 64):
        replies, _ = feed(reply_extractor(QueryAllRequest(1)), garbage + reply.to_bytes(), chunk)
        assert replies == [reply], (garbage.hex(" "), chunk)


@pytest.mark.parametrize(
    "request_, good, noise",
    [
        (QueryRequest(1, 3), LockReply(0x80, 1, 3, 0x11), H("80 01 03 33 B1")),  # echo of the query
        (QueryRequest(1, 3), LockReply(0x80, 1, 3, 0x00), LockReply(0x80, 1, 4, 0x11).to_bytes()),  # other lock
        (QueryRequest(1, 3), LockReply(0x80, 1, 3, 0x00), LockReply(0x8A, 1, 3, 0x11).to_bytes()),  # other header
        (QueryRequest(1, 3), LockReply(0x80, 1, 3, 0x00), LockReply(0x80, 2, 3, 0x11).to_bytes()),  # other board
        (UnlockRequest(5, 24), LockReply(0x8A, 5, 24, 0x11), H("8A 05 18 11 87")),  # bad BCC
        (UnlockRequest(5, 24), LockReply(0x8A, 5, 24, 0x11), AllReply(5, 0, 0, 0).to_bytes()),
    ],
)
def test_extractor_skips_mismatched_frames(request_, good, noise):
    for chunk in (1, 64):
        replies, buf = feed(reply_extractor(request_), noise + good.to_bytes(), chunk)
        assert replies == [good]
        assert buf == b""


def test_extractor_mismatched_address_alone_gives_nothing():
    other = LockReply(0x80, 2, 1, 0x11).to_bytes()
    replies, buf = feed(reply_extractor(QueryRequest(1, 1)), other)
    assert replies == []
    assert len(buf) < 5  # the foreign frame was discarded, not kept waiting


@pytest.mark.parametrize(
    "request_, prefix",
    [
        (QueryAllRequest(1), H("80 01 00 00 00 11")),  # the 6th byte of a query-all reply must be 33
        (QueryRequest(1, 3), H("80 01 04")),  # another lock
        (QueryRequest(1, 3), H("80 01 03 33")),  # S must be 00 or 11 (the query's echo)
        (UnlockRequest(1, 3), H("8A 02")),  # another board
    ],
)
def test_extractor_drops_a_hopeless_prefix_without_waiting_for_more(request_, prefix):
    buf = bytearray(prefix)
    assert reply_extractor(request_)(buf) is None
    assert buf == b""


def test_extractor_garbage_inside_a_reply_drops_it_and_finds_the_next():
    good = LockReply(0x80, 1, 2, 0x11).to_bytes()
    torn = good[:3] + H("55") + good[3:]  # a byte inserted inside: that copy is invalid
    replies, _ = feed(reply_extractor(QueryRequest(1, 2)), torn + good)
    assert replies == [LockReply(0x80, 1, 2, 0x11)]


def test_extractor_false_start_overlapping_real_reply():
    # "80 01" then the real reply: the first 7 bytes are not a frame, the frame starts at 2
    good = AllReply(1, 0x80, 0x01, 0x33).to_bytes()
    replies, _ = feed(reply_extractor(QueryAllRequest(1)), H("80 01") + good, 64)
    assert replies == [AllReply(1, 0x80, 0x01, 0x33)]


@given(st.binary(max_size=40).filter(lambda g: 0x8A not in g), st.binary(max_size=3), st.integers(1, 24), status,
       st.integers(1, 8))
def test_extractor_finds_reply_behind_garbage_without_its_header(garbage, tail, lock, s, chunk):
    reply = LockReply(0x8A, 7, lock, s)
    replies, _ = feed(reply_extractor(UnlockRequest(7, lock)), garbage + reply.to_bytes() + tail, chunk)
    assert replies == [reply]


@given(st.binary(max_size=40), st.integers(1, 24), status, st.integers(1, 8))
def test_extractor_always_yields_a_matching_reply_behind_any_garbage(garbage, lock, s, chunk):
    # Garbage may by chance hold a valid reply (or one overlapping the real one): whatever is
    # returned must still match the request and lie in the stream, and something must be.
    stream = garbage + LockReply(0x8A, 7, lock, s).to_bytes()
    replies, _ = feed(reply_extractor(UnlockRequest(7, lock)), stream, chunk)
    assert replies
    for r in replies:
        assert (r.header, r.address, r.lock) == (0x8A, 7, lock)
        assert r.to_bytes() in stream


@given(st.binary(max_size=64))
def test_extractor_never_returns_a_wrong_reply(data):
    extract = reply_extractor(QueryAllRequest(9))
    replies, _ = feed(extract, data)
    for reply in replies:
        assert reply.address == 9
        assert reply.to_bytes() in data


def test_extractor_rejects_non_request():
    with pytest.raises(TypeError):
        reply_extractor(LockReply(0x80, 1, 1, 0))  # type: ignore[call-overload]


# ------------------------------------------------------------------ the simulator's request scanner


def test_request_scanner_resyncs_and_keeps_incomplete_tail():
    data = (H("00 8A 01") + UnlockRequest(1, 1).to_bytes() + H("80 01 00 33 B3") + QueryAllRequest(2).to_bytes()
            + H("80 01"))
    buf = bytearray(data)
    assert take_request_frames(buf) == [H("8A 01 01 11 9B"), QueryAllRequest(2).to_bytes()]
    assert buf == H("80 01")
