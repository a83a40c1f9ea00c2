"""Modbus RTU codec of the shelf-scale transmitters against spec/serial.md's bytes."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from drivers.errors import FrameError
from drivers.scales.codec import (
    INT32_MAX,
    INT32_MIN,
    ExceptionReply,
    ReadHoldingReply,
    ReadHoldingRequest,
    Status,
    crc16,
    decode_weight,
    encode_weight,
    int32_to_words,
    reply_extractor,
    words_to_int32,
)

H = bytes.fromhex

slaves = st.integers(1, 247)
words = st.integers(0, 0xFFFF)


# ---------------------------------------------------------------- spec examples


def test_spec_read_status_request() -> None:
    assert ReadHoldingRequest(1, 0x0008, 1).to_bytes() == H("01 03 00 08 00 01 05 C8")


def test_spec_read_gross_request() -> None:
    assert ReadHoldingRequest(1, 0x0050, 2).to_bytes() == H("01 03 00 50 00 02 C4 1A")


def test_spec_gross_reply_13_2_grams() -> None:
    frame = H("01 03 04 00 00 00 84 FA 50")
    reply = ReadHoldingReply.from_bytes(frame)
    assert reply == ReadHoldingReply(1, (0x0000, 0x0084))
    assert decode_weight(*reply.values, decimals=1) == 13.2
    assert ReadHoldingReply(1, encode_weight(13.2, 1)).to_bytes() == frame


def test_spec_requests_decode() -> None:
    assert ReadHoldingRequest.from_bytes(H("01 03 00 08 00 01 05 C8")) == ReadHoldingRequest(1, 8, 1)
    assert ReadHoldingRequest.from_bytes(H("01 03 00 50 00 02 C4 1A")) == ReadHoldingRequest(1, 0x50, 2)


# ---------------------------------------------------------------- CRC


def test_crc_known_values() -> None:
    # CRC of the spec's status request body is 0xC805: low byte 05 first on the wire.
    assert crc16(H("01 03 00 08 00 01")) == 0xC805
    assert crc16(b"") == 0xFFFF
    # Standard CRC-16/MODBUS check value.
    assert crc16(b"123456789") == 0x4B37


@given(st.binary(min_size=1, max_size=64))
def test_crc_of_frame_with_crc_appended_is_zero(data: bytes) -> None:
    crc = crc16(data)
    assert crc16(data + bytes((crc & 0xFF, crc >> 8))) == 0


@given(slaves, st.integers(0, 0xFFFF), st.integers(1, 125), st.integers(0, 7), st.integers(0, 7))
def test_any_single_bit_flip_is_rejected(slave: int, reg: int, count: int, pos: int, bit: int) -> None:
    frame = bytearray(ReadHoldingRequest(slave, reg, count).to_bytes())
    frame[pos] ^= 1 << bit
    with pytest.raises(FrameError):
        ReadHoldingRequest.from_bytes(frame)


# ---------------------------------------------------------------- round trips and validation


@given(slaves, st.integers(0, 0xFFFF), st.integers(1, 125))
def test_request_round_trip(slave: int, reg: int, count: int) -> None:
    req = ReadHoldingRequest(slave, reg, count)
    data = req.to_bytes()
    assert len(data) == 8 and data[0] == slave and data[1] == 0x03
    assert ReadHoldingRequest.from_bytes(data) == req


@given(slaves, st.lists(words, min_size=1, max_size=125))
def test_reply_round_trip(slave: int, values: list[int]) -> None:
    reply = ReadHoldingReply(slave, tuple(values))
    data = reply.to_bytes()
    assert len(data) == 5 + 2 * len(values) and data[2] == 2 * len(values)
    assert ReadHoldingReply.from_bytes(data) == reply


@given(slaves, st.integers(0x80, 0xFF), st.integers(0, 0xFF))
def test_exception_round_trip(slave: int, function: int, code: int) -> None:
    exc = ExceptionReply(slave, function, code)
    assert ExceptionReply.from_bytes(exc.to_bytes()) == exc


def test_exception_frame_bytes() -> None:
    frame = ExceptionReply(1, 0x83, 0x02).to_bytes()
    assert frame[:3] == H("01 83 02")
    assert frame == H("01 83 02 C0 F1")
    decoded = ExceptionReply.from_bytes(frame)
    assert decoded.code == 2 and decoded.request_function == 0x03


@pytest.mark.parametrize(
    "make",
    [
        lambda: ReadHoldingRequest(0, 8, 1),
        lambda: ReadHoldingRequest(248, 8, 1),
        lambda: ReadHoldingRequest(1, 0x10000, 1),
        lambda: ReadHoldingRequest(1, 8, 0),
        lambda: ReadHoldingRequest(1, 8, 126),
        lambda: ReadHoldingReply(1, ()),
        lambda: ReadHoldingReply(1, (0x10000,)),
        lambda: ExceptionReply(1, 0x03, 2),
    ],
)
def test_invalid_fields_rejected(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "decode, data",
    [
        (ReadHoldingRequest.from_bytes, H("01 03 00 08 00 01 05")),  # short
        (ReadHoldingRequest.from_bytes, H("01 03 00 08 00 01 05 C8 00")),  # long
        (ReadHoldingRequest.from_bytes, H("01 03 00 08 00 01 05 C9")),  # CRC
        (ReadHoldingRequest.from_bytes, bytes(ExceptionReply(1, 0x83, 2).to_bytes())),
        (ReadHoldingReply.from_bytes, H("01 03 04 00 00 00 84 FA")),  # short
        (ReadHoldingReply.from_bytes, H("01 03 04 00 00 00 84 FA 51")),  # CRC
        (ReadHoldingReply.from_bytes, H("01 03")),
        (ExceptionReply.from_bytes, H("01 83 02 C0")),
        (ExceptionReply.from_bytes, H("01 83 02 C0 F0")),
    ],
)
def test_bad_frames_raise_frame_error(decode, data: bytes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FrameError):
        decode(data)


def test_wrong_function_with_valid_crc_is_frame_error() -> None:
    from drivers.scales.codec import append_crc

    with pytest.raises(FrameError):
        ReadHoldingRequest.from_bytes(append_crc(H("01 04 00 08 00 01")))
    with pytest.raises(FrameError):
        ReadHoldingReply.from_bytes(append_crc(H("01 04 02 00 00")))
    with pytest.raises(FrameError):
        ReadHoldingReply.from_bytes(append_crc(H("01 03 03 00 00 00")))  # odd byte count
    with pytest.raises(FrameError):
        ExceptionReply.from_bytes(append_crc(H("01 03 02")))  # no 0x80 bit


# ---------------------------------------------------------------- status and weights


@pytest.mark.parametrize(
    "value, status",
    [
        (0x0000, Status(False, False, 0)),
        (0x0001, Status(False, False, 1)),
        (0x0020, Status(True, False, 0)),
        (0x0040, Status(False, True, 0)),
        (0x0063, Status(True, True, 3)),
        (0xFF9A, Status(False, False, 2)),  # other bits ignored; 0x9A: bit5=0, bit6=0, d=2
    ],
)
def test_status_register_decoding(value: int, status: Status) -> None:
    assert Status.from_register(value) == status


@given(st.booleans(), st.booleans(), st.integers(0, 7))
def test_status_round_trip(motion: bool, overload: bool, decimals: int) -> None:
    s = Status(motion, overload, decimals)
    assert Status.from_register(s.to_register()) == s


@pytest.mark.parametrize(
    "high, low, raw",
    [
        (0x0000, 0x0084, 132),
        (0xFFFF, 0xFFFF, -1),
        (0xFFFF, 0xFF7C, -132),
        (0x7FFF, 0xFFFF, INT32_MAX),
        (0x8000, 0x0000, INT32_MIN),
        (0x0001, 0x0000, 65536),
    ],
)
def test_signed_32_bit_high_word_first(high: int, low: int, raw: int) -> None:
    assert words_to_int32(high, low) == raw
    assert int32_to_words(raw) == (high, low)


@pytest.mark.parametrize(
    "raw, decimals, grams",
    [(132, 1, 13.2), (132, 0, 132.0), (132, 2, 1.32), (132, 3, 0.132), (-132, 1, -13.2), (-5, 3, -0.005)],
)
def test_weight_decimals(raw: int, decimals: int, grams: float) -> None:
    assert decode_weight(*int32_to_words(raw), decimals=decimals) == grams
    assert encode_weight(grams, decimals) == int32_to_words(raw)


def test_negative_weight_reply_bytes() -> None:
    frame = ReadHoldingReply(1, encode_weight(-13.2, 1)).to_bytes()
    assert frame[3:7] == H("FF FF FF 7C")
    assert decode_weight(*ReadHoldingReply.from_bytes(frame).values, decimals=1) == -13.2


@given(st.integers(INT32_MIN, INT32_MAX), st.integers(0, 3))
def test_weight_round_trip(raw: int, decimals: int) -> None:
    grams = decode_weight(*int32_to_words(raw), decimals=decimals)
    assert encode_weight(grams, decimals) == int32_to_words(raw)


def test_weight_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_weight(2**31 / 10, 1)
    with pytest.raises(ValueError):
        int32_to_words(INT32_MIN - 1)


# ---------------------------------------------------------------- extractor

GROSS_REQ = ReadHoldingRequest(1, 0x0050, 2)
GROSS_REPLY = H("01 03 04 00 00 00 84 FA 50")


def test_extractor_whole_reply() -> None:
    buf = bytearray(GROSS_REPLY)
    assert reply_extractor(GROSS_REQ)(buf) == ReadHoldingReply(1, (0, 0x84))
    assert buf == b""


def test_extractor_one_byte_at_a_time() -> None:
    extract = reply_extractor(GROSS_REQ)
    buf = bytearray()
    results = []
    for b in GROSS_REPLY:
        buf.append(b)
        results.append(extract(buf))
    assert results[:-1] == [None] * (len(GROSS_REPLY) - 1)
    assert results[-1] == ReadHoldingReply(1, (0, 0x84))


def test_extractor_exception_reply() -> None:
    buf = bytearray(H("01 83 02 C0 F1"))
    assert reply_extractor(GROSS_REQ)(buf) == ExceptionReply(1, 0x83, 2)


@pytest.mark.parametrize(
    "garbage",
    [
        H("FF 00 13"),
        H("01"),  # our address alone
        H("01 03"),
        H("01 03 04"),  # looks like the start of our reply
        H("01 03 04 00 00 00 84 FA 51"),  # our reply with a bad CRC
        H("02 03 04 00 00 00 84 ") + bytes(2),  # another slave
        ReadHoldingReply(2, (0, 0x84)).to_bytes(),  # another slave, valid CRC
        ReadHoldingReply(1, (0x0021,)).to_bytes(),  # right slave, wrong byte count (stale status reply)
        H("01 83 02 C0"),  # truncated exception
    ],
)
def test_extractor_resyncs_past_garbage(garbage: bytes) -> None:
    data = garbage + GROSS_REPLY
    # Whole at once, and one byte at a time: the same single reply either way.
    assert reply_extractor(GROSS_REQ)(bytearray(data)) == ReadHoldingReply(1, (0, 0x84))
    extract = reply_extractor(GROSS_REQ)
    buf = bytearray()
    got = [r for b in data if (buf.append(b), r := extract(buf))[1] is not None]
    assert got == [ReadHoldingReply(1, (0, 0x84))]


def test_extractor_returns_none_and_drops_pure_garbage() -> None:
    buf = bytearray(H("FF FE 00 13 37"))
    assert reply_extractor(GROSS_REQ)(buf) is None
    assert buf == b""


def test_extractor_keeps_possible_start_of_reply() -> None:
    buf = bytearray(H("55 01 03 04 00"))
    assert reply_extractor(GROSS_REQ)(buf) is None
    assert buf == H("01 03 04 00")


@given(st.binary(max_size=40), slaves, st.lists(words, min_size=1, max_size=4), st.integers(1, 7))
def test_extractor_finds_reply_after_random_garbage(
    garbage: bytes, slave: int, values: list[int], chunk: int
) -> None:
    req = ReadHoldingRequest(slave, 0x50, len(values))
    reply = ReadHoldingReply(slave, tuple(values))
    assume(reply_extractor(req)(bytearray(garbage)) is None)  # garbage holding a real reply
    data = garbage + reply.to_bytes()
    extract = reply_extractor(req)
    buf = bytearray()
    found = None
    for i in range(0, len(data), chunk):
        buf += data[i : i + chunk]
        found = extract(buf)
        if found is not None:
            break
    assert found == reply
