"""LockBoardClient against the real LockBoardSimulator over a real pty (no mocks).

Timing is never synchronised with sleeps: state that changes with time (the latch relatching)
is polled with a deadline, frames are awaited with the simulator's wait_for_frame.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from drivers.errors import LinkTimeout
from drivers.lockboard.client import LockBoardClient
from drivers.lockboard.codec import (
    AllReply,
    QueryAllRequest,
    QueryRequest,
    UnlockFailed,
    UnlockRequest,
    bcc,
    reply_extractor,
)
from drivers.lockboard.simulator import LockBoardSimulator
from drivers.serial_link import SerialLink
from helpers import wait_until

H = bytes.fromhex
TIMEOUT_S = 0.08


def raw_reply(link: SerialLink, request: bytes, length: int) -> bytes:
    """The first ``length`` bytes the board sends back, unparsed: checks the simulator's wire bytes."""
    return link.transact(request, lambda buf: bytes(buf[:length]) if len(buf) >= length else None, TIMEOUT_S)


@pytest.fixture
def make_board() -> Iterator[Callable[..., tuple[LockBoardSimulator, LockBoardClient, SerialLink]]]:
    sims: list[LockBoardSimulator] = []
    links: list[SerialLink] = []

    def make(client_address: int = 1, client_polarity: int | None = None, **sim_kwargs):
        sim = LockBoardSimulator(**sim_kwargs).start()
        sims.append(sim)
        link = SerialLink(sim.port, timeout_s=TIMEOUT_S)
        links.append(link)
        polarity = sim.feedback_open if client_polarity is None else client_polarity
        return sim, LockBoardClient(link, client_address, feedback_open=polarity), link

    yield make
    for link in links:
        link.close()
    for sim in sims:
        sim.stop()


@pytest.fixture
def board(make_board):
    return make_board()


def frames(sim: LockBoardSimulator) -> list[bytes]:
    return [frame for _, frame in sim.received]


# ------------------------------------------------------------------ unlock, query


def test_unlock_sends_spec_bytes_and_reports_open(board):
    sim, client, _ = board
    assert client.unlock(1) is True
    assert frames(sim) == [H("8A 01 01 11 9B")]
    assert sim.is_released(1)
    assert not sim.is_open(1)  # nobody pulled the door yet
    assert client.query(1) is True  # feedback reads open while released
    assert client.query(2) is False


def test_unlock_reply_bytes_are_the_spec_bytes(board):
    sim, _, link = board
    assert raw_reply(link, H("8A 01 01 11 9B"), 5) == H("8A 01 01 11 9B")
    assert raw_reply(link, H("80 01 02 33 B0"), 5) == H("80 01 02 00 83")


def test_query_follows_forced_door(board):
    sim, client, _ = board
    assert client.query(7) is False
    sim.force_open(7)
    assert client.query(7) is True
    assert frames(sim)[-1] == QueryRequest(1, 7).to_bytes()


def test_unlock_with_inverted_polarity(make_board):
    sim, client, link = make_board(feedback_open=0)
    assert raw_reply(link, H("80 01 03 33 B1"), 5) == H("80 01 03 11 93")  # shut reads S=11
    assert client.query(3) is False
    assert client.unlock(3) is True
    assert raw_reply(link, H("80 01 03 33 B1"), 5) == H("80 01 03 00 82")  # released reads S=00


def test_client_with_wrong_polarity_sees_the_opposite(make_board):
    # guards against a client that ignores feedback_open
    _, client, _ = make_board(feedback_open=0, client_polarity=1)
    assert client.query(3) is True


@pytest.mark.parametrize("lock", [0, 25, -1, True])
def test_lock_number_is_validated(board, lock):
    sim, client, _ = board
    for call in (client.unlock, client.query):
        with pytest.raises(ValueError):
            call(lock)
    assert sim.received == []


@pytest.mark.parametrize("kwargs", [{"address": 0}, {"address": 256}, {"address": 1, "feedback_open": 2}])
def test_client_constructor_validates(kwargs):
    with pytest.raises(ValueError):
        LockBoardClient(SerialLink("loop://"), **kwargs)


# ------------------------------------------------------------------ query all


def test_query_all_all_shut(board):
    sim, client, link = board
    assert client.query_all() == {lock: False for lock in range(1, 25)}
    assert frames(sim) == [H("80 01 00 33 B2")]
    assert raw_reply(link, H("80 01 00 33 B2"), 7) == H("80 01 00 00 00 33 B2")


def test_query_all_bits_of_high_locks_and_byte_order(board):
    sim, client, link = board
    opened = [2, 10, 11, 24]
    for lock in opened:
        sim.force_open(lock)
    body = H("80 01 80 06 02 33")  # B3 = lock 24, B2 = locks 10 and 11, B1 = lock 2
    assert raw_reply(link, QueryAllRequest(1).to_bytes(), 7) == body + bytes([bcc(body)])
    state = client.query_all()
    assert sorted(state) == list(range(1, 25))
    assert [lock for lock, is_open in state.items() if is_open] == opened


def test_query_all_boundaries_9_16_17(board):
    sim, client, _ = board
    for lock in (8, 9, 16, 17):
        sim.force_open(lock)
    assert [lock for lock, is_open in client.query_all().items() if is_open] == [8, 9, 16, 17]


def test_query_all_inverted_polarity(make_board):
    sim, client, link = make_board(feedback_open=0)
    body = H("80 01 FF FF FF 33")  # every lock shut: every bit set
    assert raw_reply(link, QueryAllRequest(1).to_bytes(), 7) == body + bytes([bcc(body)])
    assert client.query_all() == {lock: False for lock in range(1, 25)}
    sim.force_open(5)
    sim.force_open(18)
    body = H("80 01 FD FF EF 33")
    assert raw_reply(link, QueryAllRequest(1).to_bytes(), 7) == body + bytes([bcc(body)])
    assert [lock for lock, is_open in client.query_all().items() if is_open] == [5, 18]


def test_board_with_fewer_locks(make_board):
    sim, client, _ = make_board(locks=8)
    sim.force_open(8)
    assert [lock for lock, is_open in client.query_all().items() if is_open] == [8]
    with pytest.raises(LinkTimeout):
        client.query(9)


# ------------------------------------------------------------------ silence, garbage, addressing


def test_silent_board_times_out(board):
    sim, client, _ = board
    sim.set_silent(True)
    started = time.monotonic()
    with pytest.raises(LinkTimeout):
        client.query_all()
    assert time.monotonic() - started >= TIMEOUT_S
    with pytest.raises(LinkTimeout):
        client.query(1)
    assert frames(sim) == [QueryAllRequest(1).to_bytes(), QueryRequest(1, 1).to_bytes()]
    sim.set_silent(False)
    assert client.query(1) is False


def test_silent_board_does_not_unlock(board):
    sim, client, _ = board
    sim.set_silent(True)
    with pytest.raises(UnlockFailed):
        client.unlock(4)
    assert not sim.is_released(4)
    # a silent board: unlock, then the query; the query got no answer so no second pulse
    assert frames(sim) == [UnlockRequest(1, 4).to_bytes(), QueryRequest(1, 4).to_bytes()]


@pytest.mark.parametrize(
    "garbage",
    [
        H("00 FF 55"),
        H("80 01"),  # a false start
        H("80 01 00 00 00 33 B3"),  # a query-all reply with a bad BCC
        AllReply(2, 0xFF, 0xFF, 0xFF).to_bytes(),  # a valid reply of another board
        AllReply(1, 0xFF, 0xFF, 0xFF).to_bytes()[:6],  # a torn reply of this board
    ],
)
def test_resync_after_injected_garbage(board, garbage):
    sim, client, link = board
    sim.force_open(12)
    sim.inject_garbage(garbage)  # first prove the garbage really is on the line, before the reply
    reply = AllReply.from_raw_bits(1, {12: True}).to_bytes()
    assert raw_reply(link, QueryAllRequest(1).to_bytes(), len(garbage) + 7) == garbage + reply
    sim.inject_garbage(garbage)
    assert [lock for lock, is_open in client.query_all().items() if is_open] == [12]
    sim.inject_garbage(garbage)
    assert client.query(12) is True


def test_garbage_matching_another_lock_is_ignored(board):
    sim, client, _ = board
    sim.inject_garbage(H("80 01 02 11 92"))  # a valid "open" reply, but for lock 2
    assert client.query(3) is False


def test_split_reply_arrival_with_line_time(make_board):
    sim, client, _ = make_board(byte_time_s=0.002)
    sim.force_open(17)
    assert [lock for lock, is_open in client.query_all().items() if is_open] == [17]
    assert client.unlock(1) is True


def test_wrong_address_gets_no_reply(make_board):
    sim, client, link = make_board(client_address=2)
    with pytest.raises(LinkTimeout):
        client.query_all()
    with pytest.raises(LinkTimeout):
        client.query(1)
    with pytest.raises(UnlockFailed):
        client.unlock(1)
    assert not sim.is_released(1)
    # not a single byte comes back (not even a reply carrying the board's own address)
    with pytest.raises(LinkTimeout):
        link.transact(QueryAllRequest(2).to_bytes(), lambda buf: bytes(buf) if buf else None, TIMEOUT_S)
    # the frames did reach the board, which ignored them
    assert frames(sim) == [
        QueryAllRequest(2).to_bytes(),
        QueryRequest(2, 1).to_bytes(),
        UnlockRequest(2, 1).to_bytes(),
        QueryRequest(2, 1).to_bytes(),
        QueryAllRequest(2).to_bytes(),
    ]


def test_board_at_another_address_answers_its_own(make_board):
    sim, client, _ = make_board(client_address=9, address=9)
    sim.force_open(1)
    assert client.query(1) is True
    assert frames(sim) == [H("80 09 01 33 BB")]


@pytest.mark.parametrize("request_", [UnlockRequest(1, 0), UnlockRequest(1, 25), QueryRequest(1, 25)])
def test_lock_zero_or_above_24_gets_no_reply(board, request_):
    sim, _, link = board
    with pytest.raises(LinkTimeout):
        link.transact(request_.to_bytes(), reply_extractor(request_), TIMEOUT_S)
    assert frames(sim) == [request_.to_bytes()]
    assert not any(sim.is_released(lock) for lock in range(1, 25))


def test_bad_bcc_or_unknown_command_gets_no_reply_and_board_resyncs(board):
    sim, _, link = board
    for bad in (H("8A 01 01 11 9C"), H("8A 01 01 22 A8"), H("81 01 01 33 B2")):
        with pytest.raises(LinkTimeout):
            link.transact(bad, lambda buf: bytes(buf) if buf else None, TIMEOUT_S)
    assert sim.received == []
    assert not sim.is_released(1)
    # leftover bytes in the board's buffer do not hide the next good request
    assert raw_reply(link, H("80 01") + QueryAllRequest(1).to_bytes(), 7) == H("80 01 00 00 00 33 B2")


# ------------------------------------------------------------------ never re-send an unlock blindly


def test_lost_unlock_reply_is_checked_by_query_not_resent(board):
    sim, client, _ = board
    sim.fail_next(header=0x8A, execute=True)  # the board pulses, its reply is lost
    assert client.unlock(6) is True
    assert frames(sim) == [UnlockRequest(1, 6).to_bytes(), QueryRequest(1, 6).to_bytes()]


def test_lost_unlock_request_is_sent_again_after_the_query_reads_shut(board):
    sim, client, _ = board
    sim.fail_next(header=0x8A)  # the request never reached the board
    assert client.unlock(6) is True
    assert frames(sim) == [
        UnlockRequest(1, 6).to_bytes(),
        QueryRequest(1, 6).to_bytes(),
        UnlockRequest(1, 6).to_bytes(),
    ]
    assert sim.is_released(6)


def test_unlock_lost_twice_raises_unlock_failed(board):
    sim, client, _ = board
    sim.fail_next(2, header=0x8A)
    with pytest.raises(UnlockFailed):
        client.unlock(6)
    assert frames(sim) == [
        UnlockRequest(1, 6).to_bytes(),
        QueryRequest(1, 6).to_bytes(),
        UnlockRequest(1, 6).to_bytes(),
    ]
    assert not sim.is_released(6)


# ------------------------------------------------------------------ latch and door model


def test_latch_relatches_when_door_not_opened(make_board):
    sim, client, _ = make_board(latch_release_s=0.1)
    pulsed = time.monotonic()
    assert client.unlock(2) is True
    wait_until(lambda: client.query(2) is False, 2.0, "lock 2 to relatch")
    assert time.monotonic() - pulsed >= 0.1
    assert sim.open_door(2) is False  # too late: the latch holds the door
    assert client.query(2) is False


def test_opened_door_stays_open_until_closed(make_board):
    sim, client, _ = make_board(latch_release_s=0.1)
    assert client.unlock(3) is True
    assert sim.open_door(3) is True
    wait_until(lambda: not sim.is_released(3), 2.0, "the latch release of lock 3 to end")
    assert client.query(3) is True  # latch timer is over, but the door is open
    assert client.query_all()[3] is True
    sim.close_door(3)
    assert client.query(3) is False
    assert sim.open_door(3) is False  # pushed shut: latched again


def test_closing_a_door_within_the_release_window_latches_it(board):
    sim, client, _ = board  # latch_release_s = 0.5
    assert client.unlock(1) is True
    assert sim.open_door(1) is True
    sim.close_door(1)
    assert client.query(1) is False


def test_door_cannot_be_opened_without_unlock(board):
    sim, client, _ = board
    assert sim.open_door(5) is False
    assert not sim.is_open(5)
    assert client.query(5) is False


def test_on_unlock_callback_lets_a_shopper_open(make_board):
    opened = threading.Event()

    def shopper(lock: int) -> None:
        if sim.open_door(lock):
            opened.set()

    sim, client, _ = make_board(on_unlock=shopper)
    assert client.unlock(8) is True
    assert opened.wait(2.0)
    assert sim.is_open(8)


def test_wait_for_frame_with_deadline(board):
    sim, client, _ = board
    assert sim.wait_for_frame(lambda f: f[0] == 0x8A, timeout=0.02) is None
    waiter: list = []
    thread = threading.Thread(target=lambda: waiter.append(sim.wait_for_frame(lambda f: f[0] == 0x8A, 2.0)))
    thread.start()
    client.query(1)
    before = time.monotonic()
    client.unlock(1)
    thread.join(3.0)
    assert waiter and waiter[0] is not None
    at, frame = waiter[0]
    assert frame == UnlockRequest(1, 1).to_bytes()
    assert before <= at <= time.monotonic()
    assert sim.wait_for_frame(lambda f: f[0] == 0x80, 0.0, since=2) is None
