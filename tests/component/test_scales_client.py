"""ScaleClient over a real SerialLink against the real simulator on a pty (no mocks)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from drivers.errors import DeviceError, FrameError, LinkTimeout
from drivers.scales.client import ModbusExceptionError, Reading, ScaleClient
from drivers.scales.codec import (
    ExceptionReply,
    ReadHoldingReply,
    ReadHoldingRequest,
    Status,
    append_crc,
    decode_weight,
    reply_extractor,
)
from drivers.scales.simulator import ScaleSimulator
from drivers.serial_link import SerialLink

H = bytes.fromhex
TIMEOUT = 0.05  # absent-slave reply timeout in these tests (spec default 100 ms)
ANSWER_TIMEOUT = 2.0  # generous deadline for replies that must come


@pytest.fixture
def sim() -> Iterator[ScaleSimulator]:
    s = ScaleSimulator({1: 13.2, 2: 250.0, 3: -13.2, 7: 0.0}, decimals=1, noise_divisions=0.0, seed=1)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def link(sim: ScaleSimulator) -> Iterator[SerialLink]:
    lk = SerialLink(sim.port, timeout_s=ANSWER_TIMEOUT)
    yield lk
    lk.close()


@pytest.fixture
def client(link: SerialLink) -> ScaleClient:
    return ScaleClient(link, reply_timeout_s=ANSWER_TIMEOUT)


def raw(link: SerialLink, request: ReadHoldingRequest,
        timeout: float = ANSWER_TIMEOUT) -> ReadHoldingReply | ExceptionReply:
    return link.transact(request.to_bytes(), reply_extractor(request), timeout)


def test_spec_bytes_on_the_wire(sim: ScaleSimulator, link: SerialLink) -> None:
    reply = link.transact(H("01 03 00 50 00 02 C4 1A"), reply_extractor(ReadHoldingRequest(1, 0x50, 2)))
    assert reply.to_bytes() == H("01 03 04 00 00 00 84 FA 50")
    assert sim.received[-1].frame == H("01 03 00 50 00 02 C4 1A")


def test_read_status_and_gross_of_several_slaves(client: ScaleClient) -> None:
    for slave, grams in [(1, 13.2), (2, 250.0), (3, -13.2), (7, 0.0)]:
        assert client.read_status(slave) == Status(motion=False, overload=False, decimals=1)
        assert client.read_gross(slave, 1) == grams
        assert client.read(slave) == Reading(grams, motion=False, overload=False, decimals=1)


def test_reading_division(client: ScaleClient) -> None:
    assert client.read(1).division_g == pytest.approx(0.1)


def test_weight_changes_are_seen(sim: ScaleSimulator, client: ScaleClient) -> None:
    sim.add_weight(2, -55.3)
    assert client.read(2).gross_g == 194.7
    sim.set_weight(2, -1234.5)  # negative: signed 32-bit on the wire
    assert client.read(2).gross_g == -1234.5


@pytest.mark.parametrize("decimals, grams", [(0, 1250.0), (1, 125.3), (2, 12.53), (3, 1.253)])
def test_decimals(sim: ScaleSimulator, client: ScaleClient, decimals: int, grams: float) -> None:
    sim.set_decimals(2, decimals)
    sim.set_weight(2, grams)
    reading = client.read(2)
    assert reading.decimals == decimals
    assert reading.gross_g == grams
    assert reading.division_g == pytest.approx(10.0**-decimals)


def test_overload_bit(sim: ScaleSimulator, client: ScaleClient) -> None:
    sim.set_overload(1, True)
    r = client.read(1)
    assert r.overload and not r.motion
    assert client.read(2).overload is False
    sim.set_overload(1, False)
    assert client.read(1).overload is False


def test_motion_bit_and_wandering_weight(sim: ScaleSimulator, client: ScaleClient) -> None:
    sim.set_motion(2, True)
    readings = [client.read(2) for _ in range(20)]
    assert all(r.motion for r in readings)
    weights = [r.gross_g for r in readings]
    assert max(weights) - min(weights) > 2 * 0.1  # wanders by more than the stability limit
    sim.set_motion(2, False)
    assert client.read(2) == Reading(250.0, motion=False, overload=False, decimals=1)


def test_jitter_is_below_one_division() -> None:
    with ScaleSimulator({5: 100.04}, decimals=1, noise_divisions=0.4, seed=3) as sim:
        client = ScaleClient(SerialLink(sim.port), reply_timeout_s=ANSWER_TIMEOUT)
        weights = {client.read_gross(5, 1) for _ in range(30)}
        client.link.close()
    assert weights <= {100.0, 100.1}
    assert len(weights) == 2  # the jitter is really there (seeded, so deterministic)


def test_gross_and_net_in_one_request(link: SerialLink) -> None:
    reply = raw(link, ReadHoldingRequest(3, 0x50, 4))
    assert isinstance(reply, ReadHoldingReply)
    gross, net = decode_weight(*reply.values[:2], decimals=1), decode_weight(*reply.values[2:], decimals=1)
    assert gross == net == -13.2
    reply = raw(link, ReadHoldingRequest(3, 0x52, 2))
    assert decode_weight(*reply.values, decimals=1) == -13.2


@pytest.mark.parametrize(
    "register, count",
    [(0x0008, 2), (0x0007, 1), (0x0009, 1), (0x0050, 1), (0x0050, 3), (0x0051, 2), (0x0052, 4), (0x0054, 2)],
)
def test_bad_register_range_gets_exception_02(link: SerialLink, register: int, count: int) -> None:
    reply = raw(link, ReadHoldingRequest(1, register, count))
    assert reply == ExceptionReply(1, 0x83, 0x02)


def test_client_raises_device_error_with_the_code(client: ScaleClient) -> None:
    with pytest.raises(DeviceError) as info:
        client.read_registers(2, 0x0051, 2)
    assert isinstance(info.value, ModbusExceptionError)
    assert (info.value.slave, info.value.function, info.value.code) == (2, 0x83, 0x02)


def test_other_function_gets_exception_01(sim: ScaleSimulator, link: SerialLink) -> None:
    # Read input registers (0x04): the transmitter only knows 0x03.
    request = append_crc(H("01 04 00 50 00 02"))
    reply = link.transact(request, _exception_extractor(1), ANSWER_TIMEOUT)
    assert reply == ExceptionReply(1, 0x84, 0x01)


def _exception_extractor(slave: int) -> Callable[[bytearray], ExceptionReply | None]:
    def extract(buf: bytearray) -> ExceptionReply | None:
        while len(buf) >= 5:
            try:
                reply = ExceptionReply.from_bytes(bytes(buf[:5]))
            except FrameError:
                del buf[0]
                continue
            if reply.slave == slave:
                return reply
            del buf[0]
        return None

    return extract


def test_absent_slave_times_out(sim: ScaleSimulator, link: SerialLink) -> None:
    client = ScaleClient(link, reply_timeout_s=TIMEOUT)
    t0 = time.monotonic()
    with pytest.raises(LinkTimeout):
        client.read(9)
    assert time.monotonic() - t0 < 1.0
    assert sim.wait_received(1, ANSWER_TIMEOUT)
    assert sim.received[-1].slave == 9  # the request did go out; nobody answered


def test_removed_and_readded_transmitter(sim: ScaleSimulator, link: SerialLink) -> None:
    client = ScaleClient(link, reply_timeout_s=TIMEOUT)
    sim.remove(1)
    with pytest.raises(LinkTimeout):
        client.read_status(1)
    assert client.read(2).gross_g == 250.0  # the others still answer
    sim.add(1, 42.0)
    client.reply_timeout_s = ANSWER_TIMEOUT
    assert client.read(1).gross_g == 42.0


def test_silent_bus_times_out_but_logs(sim: ScaleSimulator, link: SerialLink) -> None:
    sim.set_silent(True)
    client = ScaleClient(link, reply_timeout_s=TIMEOUT)
    with pytest.raises(LinkTimeout):
        client.read_status(1)
    assert sim.wait_received(1, ANSWER_TIMEOUT)
    assert sim.received[0].frame == H("01 03 00 08 00 01 05 C8")
    sim.set_silent(False)
    client.reply_timeout_s = ANSWER_TIMEOUT
    assert client.read_status(1).decimals == 1


def test_bad_crc_gets_no_reply(sim: ScaleSimulator, link: SerialLink) -> None:
    request = ReadHoldingRequest(1, 0x08, 1)
    with pytest.raises(LinkTimeout):
        link.transact(H("01 03 00 08 00 01 05 C9"), reply_extractor(request), TIMEOUT)
    # A good request afterwards is answered, and it is the only frame the simulator saw:
    # the one with the bad CRC was not a frame at all.
    assert raw(link, request) == ReadHoldingReply(1, (0x0001,))
    assert [r.frame for r in sim.received] == [request.to_bytes()]


def test_resync_after_garbage_from_the_transmitter(sim: ScaleSimulator, client: ScaleClient) -> None:
    # Line noise, then something that looks like the start of our reply, then a stale frame.
    sim.inject_garbage(H("FF 00 01 03 04 00") + ReadHoldingReply(1, (0x21,)).to_bytes())
    assert client.read_gross(1, 1) == 13.2
    sim.inject_garbage(H("01 83 02 00 00 01 03"))
    assert client.read_status(1) == Status(False, False, 1)


def test_simulator_resyncs_past_garbage_before_a_request(sim: ScaleSimulator, link: SerialLink) -> None:
    # Garbage in front of the request on the line (another device's noise, a half frame).
    request = ReadHoldingRequest(2, 0x50, 2)
    for garbage in (H("00 FF 13"), H("02 03 00"), H("02 10 00 00 00 7F FE 00")):
        reply = link.transact(garbage + request.to_bytes(), reply_extractor(request), ANSWER_TIMEOUT)
        assert reply == ReadHoldingReply(2, (0, 2500))


def test_simulator_answers_byte_by_byte_at_line_speed() -> None:
    with ScaleSimulator({1: 13.2}, noise_divisions=0.0, byte_time_s=0.001) as sim:
        link = SerialLink(sim.port)
        try:
            assert ScaleClient(link, reply_timeout_s=ANSWER_TIMEOUT).read(1).gross_g == 13.2
        finally:
            link.close()


def test_simulator_survives_port_close_and_reopen(sim: ScaleSimulator, link: SerialLink) -> None:
    client = ScaleClient(link, reply_timeout_s=ANSWER_TIMEOUT)
    assert client.read(1).gross_g == 13.2
    link.close()
    assert client.read(2).gross_g == 250.0
