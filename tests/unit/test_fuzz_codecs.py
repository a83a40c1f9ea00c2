"""Fuzzing both serial decoders (issue 8): whatever bytes the line carries, the codecs raise
nothing but ``FrameError`` and the reply extractors never raise, never return a reply to
another request, and find the real reply behind garbage however the bytes are chunked.

Complements the byte-exact tests in test_lockboard_codec.py / test_scales_codec.py: those pin
the spec's examples, these throw arbitrary, truncated and corrupted frames at every decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.errors import FrameError
from drivers.lockboard import codec as lb
from drivers.scales import codec as sc

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

junk = st.binary(max_size=64)
chunk_sizes = st.lists(st.integers(1, 9), min_size=1, max_size=20)


def feed(extract: Callable[[bytearray], Any], data: bytes, chunks: list[int]) -> tuple[list[Any], bytearray]:
    """Feed ``data`` in the given chunk sizes (cycled), calling ``extract`` after each, like the link."""
    buf = bytearray()
    found: list[Any] = []
    i = n = 0
    while i < len(data):
        size = chunks[n % len(chunks)]
        n += 1
        buf += data[i:i + size]
        i += size
        reply = extract(buf)
        while reply is not None:  # the link stops at the first; keep going to see everything
            found.append(reply)
            reply = extract(buf)
    return found, buf


def mutations(frame: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, bit flips, inserted and dropped bytes of a valid frame."""
    n = len(frame)
    truncated = st.integers(0, n - 1).map(lambda k: frame[:k])
    flipped = st.tuples(st.integers(0, n - 1), st.integers(0, 7)).map(
        lambda p: frame[:p[0]] + bytes([frame[p[0]] ^ (1 << p[1])]) + frame[p[0] + 1:])
    inserted = st.tuples(st.integers(0, n), st.integers(0, 255)).map(
        lambda p: frame[:p[0]] + bytes([p[1]]) + frame[p[0]:])
    dropped = st.integers(0, n - 1).map(lambda k: frame[:k] + frame[k + 1:])
    return st.one_of(truncated, flipped, inserted, dropped)


# ------------------------------------------------------------------ lock board ("8A/80")

lb_requests = st.one_of(
    st.builds(lb.UnlockRequest, st.integers(1, 255), st.integers(1, 24)),
    st.builds(lb.QueryRequest, st.integers(1, 255), st.integers(1, 24)),
    st.builds(lb.QueryAllRequest, st.integers(1, 255)),
)


def lb_reply_for(request: lb.Request, data: st.DataObject) -> bytes:
    """A valid reply to ``request`` with a random feedback."""
    if isinstance(request, lb.QueryAllRequest):
        b1, b2, b3 = data.draw(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)))
        return lb.AllReply(request.address, b1, b2, b3).to_bytes()
    header = lb.HEADER_UNLOCK if isinstance(request, lb.UnlockRequest) else lb.HEADER_QUERY
    s = data.draw(st.sampled_from([lb.STATUS_SET, lb.STATUS_CLEAR]))
    return lb.LockReply(header, request.address, request.lock, s).to_bytes()


def lb_matches(request: lb.Request, reply: Any) -> bool:
    if isinstance(request, lb.QueryAllRequest):
        return isinstance(reply, lb.AllReply) and reply.address == request.address
    header = lb.HEADER_UNLOCK if isinstance(request, lb.UnlockRequest) else lb.HEADER_QUERY
    return (isinstance(reply, lb.LockReply) and reply.header == header and reply.address == request.address
            and reply.lock == request.lock)


@pytest.mark.parametrize("decode", [lb.UnlockRequest.from_bytes, lb.QueryRequest.from_bytes,
                                    lb.QueryAllRequest.from_bytes, lb.parse_request, lb.LockReply.from_bytes,
                                    lb.AllReply.from_bytes], ids=lambda f: f.__qualname__)
@FUZZ
@given(data=junk)
def test_lockboard_decoders_raise_only_frame_error(decode: Callable[[bytes], Any], data: bytes) -> None:
    try:
        frame = decode(data)
    except FrameError:
        return
    # what decodes re-encodes to exactly the bytes it came from: nothing is guessed
    assert frame.to_bytes() == data


@FUZZ
@given(request=lb_requests, data=junk, chunks=chunk_sizes)
def test_lockboard_extractor_never_raises_nor_answers_another_request(request: lb.Request, data: bytes,
                                                                      chunks: list[int]) -> None:
    found, _rest = feed(lb.reply_extractor(request), data, chunks)
    for reply in found:
        assert lb_matches(request, reply)
        assert reply.to_bytes() in data


@FUZZ
@given(request=lb_requests, garbage=junk, chunks=chunk_sizes, data=st.data())
def test_lockboard_reply_behind_garbage_without_its_header_is_found(request: lb.Request, garbage: bytes,
                                                                    chunks: list[int], data: st.DataObject) -> None:
    header = lb.HEADER_QUERY if isinstance(request, (lb.QueryRequest, lb.QueryAllRequest)) else lb.HEADER_UNLOCK
    garbage = bytes(b for b in garbage if b != header)
    reply = lb_reply_for(request, data)
    found, rest = feed(lb.reply_extractor(request), garbage + reply, chunks)
    assert [r.to_bytes() for r in found] == [reply]
    assert rest == bytearray()


@FUZZ
@given(request=lb_requests, data=st.data(), chunks=chunk_sizes)
def test_lockboard_corrupted_or_truncated_reply_is_never_taken_for_a_reply(request: lb.Request, data: st.DataObject,
                                                                           chunks: list[int]) -> None:
    good = lb_reply_for(request, data)
    bad = data.draw(mutations(good))
    found, _ = feed(lb.reply_extractor(request), bad, chunks)
    # a mutation may happen to be another valid reply (a flipped feedback bit): then it must still
    # be a whole, well-formed reply to this very request, never a fragment or a neighbour's
    for reply in found:
        assert lb_matches(request, reply) and reply.to_bytes() in bad


@FUZZ
@given(request=lb_requests, data=st.data(), tail=junk, chunks=chunk_sizes)
def test_lockboard_truncated_reply_followed_by_the_real_one(request: lb.Request, data: st.DataObject, tail: bytes,
                                                            chunks: list[int]) -> None:
    """A reply cut short (a byte lost on the line) then the real one: the real one is read."""
    good = lb_reply_for(request, data)
    cut = good[:data.draw(st.integers(1, len(good) - 1))]
    found, _ = feed(lb.reply_extractor(request), cut + good + tail, chunks)
    assert found and lb_matches(request, found[0])
    assert found[0].to_bytes() == good


# ------------------------------------------------------------------ scales (Modbus RTU)

sc_requests = st.builds(sc.ReadHoldingRequest, st.integers(sc.MIN_SLAVE, sc.MAX_SLAVE),
                        st.sampled_from([sc.REG_STATUS, sc.REG_GROSS, sc.REG_NET]),
                        st.sampled_from([1, 2, 4]))


def sc_reply_for(request: sc.ReadHoldingRequest, data: st.DataObject) -> bytes:
    if data.draw(st.booleans()):
        values = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=request.count, max_size=request.count))
        return sc.ReadHoldingReply(request.slave, tuple(values)).to_bytes()
    code = data.draw(st.integers(0, 255))
    return sc.ExceptionReply(request.slave, sc.FUNC_READ_HOLDING | sc.EXCEPTION_FLAG, code).to_bytes()


def sc_matches(request: sc.ReadHoldingRequest, reply: Any) -> bool:
    if isinstance(reply, sc.ExceptionReply):
        return reply.slave == request.slave and reply.function == sc.FUNC_READ_HOLDING | sc.EXCEPTION_FLAG
    return (isinstance(reply, sc.ReadHoldingReply) and reply.slave == request.slave
            and len(reply.values) == request.count)


@pytest.mark.parametrize("decode", [sc.ReadHoldingRequest.from_bytes, sc.ReadHoldingReply.from_bytes,
                                    sc.ExceptionReply.from_bytes], ids=lambda f: f.__qualname__)
@FUZZ
@given(data=junk)
def test_scale_decoders_raise_only_frame_error(decode: Callable[[bytes], Any], data: bytes) -> None:
    try:
        frame = decode(data)
    except FrameError:
        return
    assert frame.to_bytes() == data


@FUZZ
@given(body=st.binary(min_size=1, max_size=40))
def test_scale_decoders_with_a_valid_crc_raise_only_frame_error(body: bytes) -> None:
    """Random content that passes the CRC (the hard case: only the structure checks remain)."""
    data = sc.append_crc(body)
    for decode in (sc.ReadHoldingRequest.from_bytes, sc.ReadHoldingReply.from_bytes, sc.ExceptionReply.from_bytes):
        try:
            frame = decode(data)
        except FrameError:
            continue
        assert frame.to_bytes() == data


@FUZZ
@given(value=st.integers(0, 0xFFFF), high=st.integers(0, 0xFFFF), low=st.integers(0, 0xFFFF))
def test_scale_register_decoding_is_total(value: int, high: int, low: int) -> None:
    status = sc.Status.from_register(value)
    grams = sc.decode_weight(high, low, status.decimals)
    assert abs(grams) <= 2**31 and status.division_g > 0


@FUZZ
@given(request=sc_requests, data=junk, chunks=chunk_sizes)
def test_scale_extractor_never_raises_nor_answers_another_request(request: sc.ReadHoldingRequest, data: bytes,
                                                                  chunks: list[int]) -> None:
    found, _ = feed(sc.reply_extractor(request), data, chunks)
    for reply in found:
        assert sc_matches(request, reply)
        assert reply.to_bytes() in data


@FUZZ
@given(request=sc_requests, garbage=junk, chunks=chunk_sizes, data=st.data())
def test_scale_reply_behind_garbage_without_its_address_is_found(request: sc.ReadHoldingRequest, garbage: bytes,
                                                                 chunks: list[int], data: st.DataObject) -> None:
    garbage = bytes(b for b in garbage if b != request.slave)
    reply = sc_reply_for(request, data)
    found, rest = feed(sc.reply_extractor(request), garbage + reply, chunks)
    assert [r.to_bytes() for r in found] == [reply]
    assert rest == bytearray()


@FUZZ
@given(request=sc_requests, data=st.data(), chunks=chunk_sizes)
def test_scale_corrupted_or_truncated_reply_is_never_taken_for_a_reply(request: sc.ReadHoldingRequest,
                                                                       data: st.DataObject, chunks: list[int]) -> None:
    good = sc_reply_for(request, data)
    bad = data.draw(mutations(good))
    found, _ = feed(sc.reply_extractor(request), bad, chunks)
    for reply in found:
        # only a CRC-16 collision could let a corrupted frame pass: then it is still whole and ours
        assert sc_matches(request, reply) and reply.to_bytes() in bad


@FUZZ
@given(request=sc_requests, data=st.data(), tail=junk, chunks=chunk_sizes)
def test_scale_truncated_reply_followed_by_the_real_one(request: sc.ReadHoldingRequest, data: st.DataObject,
                                                        tail: bytes, chunks: list[int]) -> None:
    good = sc_reply_for(request, data)
    cut = good[:data.draw(st.integers(1, len(good) - 1))]
    found, _ = feed(sc.reply_extractor(request), cut + good + tail, chunks)
    assert found and found[0].to_bytes() == good


@FUZZ
@given(request=sc_requests, noise=st.lists(st.binary(min_size=3, max_size=12), max_size=4), chunks=chunk_sizes,
       data=st.data())
def test_scale_frames_of_other_slaves_and_bad_crcs_are_skipped(request: sc.ReadHoldingRequest,
                                                               noise: list[bytes], chunks: list[int],
                                                               data: st.DataObject) -> None:
    """Replies of other transmitters and frames with a broken CRC in front of ours (a shared bus)."""
    others = []
    for body in noise:
        slave = data.draw(st.integers(sc.MIN_SLAVE, sc.MAX_SLAVE).filter(lambda s: s != request.slave))
        framed = sc.append_crc(bytes([slave]) + body)
        if data.draw(st.booleans()):
            framed = framed[:-1] + bytes([framed[-1] ^ 0xFF])  # and a broken CRC
        others.append(framed)
    reply = sc_reply_for(request, data)
    found, _ = feed(sc.reply_extractor(request), b"".join(others) + reply, chunks)
    # a frame of another slave can never be taken; ours is found unless noise bytes happened to
    # start a CRC-valid frame of our own slave (then that one must still be whole and ours)
    assert found
    assert all(sc_matches(request, r) for r in found)
