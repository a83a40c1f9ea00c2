"""The per-door session state machine (agent.rules.doors), driven by a fake clock of plain floats.

operations.md "Shopping sessions" rules 2-4, 6, 7 and serial.md (a door counts as opened only
at a poll more than latch_release_s + 0.5 s after the pulse).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.rules.doors import (
    ActiveSession,
    Closed,
    DoorBusy,
    DoorForced,
    DoorMachine,
    LeftOpen,
    LeftOpenCleared,
    Opened,
    Phase,
    Reopened,
    Settle,
    Timing,
    resume_phase,
)

POLL = 0.25          # exact in binary floating point: poll times land exactly on window edges
WALL_OFFSET = 1_800_000_000.0  # wall clock = monotonic + offset, so the two can be told apart
SID = "6f1c2f43-2a57-4a43-9f0e-6b2f1d5b9a10"
TIMING = Timing(latch_release_s=0.5, open_timeout_s=30.0, door_open_alarm_s=120.0, settle_s=1.5)


def wall(now: float) -> float:
    return now + WALL_OFFSET


def machine(timing: Timing = TIMING, door: int = 1) -> DoorMachine:
    return DoorMachine(door, timing)


def session(unlock_at: float = 0.0, phase: Phase = Phase.WAIT_OPEN, **kw) -> ActiveSession:
    return ActiveSession(session_id=SID, door=1, shopper="shopper-7", unlock_at=unlock_at, phase=phase, **kw)


def step(m: DoorMachine, now: float, feedback: bool | None, stable: bool = True) -> list:
    return m.step(now, wall(now), feedback, stable)


def poll(m: DoorMachine, t0: float, t1: float, feedback: bool | None,
         stable: bool = True) -> list[tuple[float, object]]:
    """Poll every POLL seconds from t0 up to and including t1; returns (time, action) pairs."""
    out: list[tuple[float, object]] = []
    n = round((t1 - t0) / POLL)
    for i in range(n + 1):
        t = t0 + i * POLL
        out.extend((t, a) for a in step(m, t, feedback, stable))
    return out


def kinds(pairs: list[tuple[float, object]]) -> list[type]:
    return [type(a) for _, a in pairs]


def opened_session(m: DoorMachine, unlock_at: float = 0.0) -> float:
    """Begin a session and open its door; returns the time it counted as opened."""
    m.begin(session(unlock_at))
    t = unlock_at + 1.25
    assert step(m, t, True) == [Opened(SID, wall(t))]
    return t


# -- when a door counts as opened -------------------------------------------------------------
def test_ambiguous_window_is_latch_release_plus_half_a_second() -> None:
    assert Timing(latch_release_s=0.5).ambiguous_s == 1.0
    assert Timing(latch_release_s=2.0).ambiguous_s == 2.5


def test_feedback_open_during_latch_window_is_not_opened() -> None:
    m = machine()
    m.begin(session(unlock_at=100.0))
    # 100.0 .. 101.0 inclusive: at most latch_release_s + 0.5 s after the pulse
    assert poll(m, 100.0, 101.0, True) == []
    assert m.session is not None and m.session.phase is Phase.WAIT_OPEN
    assert m.session.opened_at is None
    assert m.open_since is None


def test_opened_at_first_poll_more_than_window_after_pulse() -> None:
    m = machine()
    m.begin(session(unlock_at=100.0))
    assert step(m, 101.0, True) == []  # exactly latch_release_s + 0.5: not "more than"
    actions = step(m, 101.001, True)
    assert actions == [Opened(SID, wall(101.001))]
    assert m.session.phase is Phase.OPEN
    assert m.session.opened_at == wall(101.001)
    assert m.is_open is True
    # still open at the next poll: no second Opened
    assert step(m, 101.25, True) == []


@pytest.mark.parametrize("latch", [0.0, 0.2, 0.5, 2.0])
def test_window_scales_with_latch_release(latch: float) -> None:
    m = machine(Timing(latch_release_s=latch, open_timeout_s=30.0))
    m.begin(session(unlock_at=10.0))
    edge = 10.0 + latch + 0.5
    assert step(m, edge, True) == []
    assert step(m, edge + 0.01, True) == [Opened(SID, wall(edge + 0.01))]


def test_door_shut_during_pulse_then_opened_later() -> None:
    m = machine()
    m.begin(session(unlock_at=0.0))
    assert poll(m, 0.0, 5.0, False) == []
    assert m.session.phase is Phase.WAIT_OPEN
    assert step(m, 5.25, True) == [Opened(SID, wall(5.25))]


@settings(max_examples=150, deadline=None)
@given(
    latch=st.floats(min_value=0.0, max_value=5.0, allow_nan=False),
    unlock_at=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    gaps=st.lists(st.floats(min_value=0.001, max_value=0.3, allow_nan=False), min_size=1, max_size=60),
)
def test_random_poll_jitter_never_opens_inside_window(latch: float, unlock_at: float, gaps: list[float]) -> None:
    """Feedback reads open from the pulse on: Opened comes at the first poll past the window, never before."""
    timing = Timing(latch_release_s=latch, open_timeout_s=3600.0)
    m = machine(timing)
    m.begin(session(unlock_at=unlock_at))
    t = unlock_at
    opened_at: list[float] = []
    for gap in gaps:
        t += gap
        for a in m.step(t, wall(t), True, True):
            if isinstance(a, Opened):
                opened_at.append(t)
    beyond = [t_ for t_ in _times(unlock_at, gaps) if t_ - unlock_at > timing.ambiguous_s]
    if beyond:
        assert opened_at == [beyond[0]]
    else:
        assert opened_at == []
        assert m.session.phase is Phase.WAIT_OPEN


def _times(start: float, gaps: list[float]) -> list[float]:
    out, t = [], start
    for g in gaps:
        t += g
        out.append(t)
    return out


# -- session timeout (rule 2) -------------------------------------------------------------------
def test_never_opened_times_out_then_settles_timed_out() -> None:
    m = machine()
    m.begin(session(unlock_at=0.0))
    assert poll(m, 0.0, 30.0, False) == []  # at exactly open_timeout_s not yet timed out
    assert m.session.phase is Phase.WAIT_OPEN
    assert step(m, 30.25, False) == []
    assert m.session.phase is Phase.TIMED_OUT
    # lanes must be stable for settle_s after the timeout before the settle
    assert poll(m, 30.5, 31.5, False) == []
    assert step(m, 31.75, False) == [Settle(SID, timed_out=True)]


def test_timed_out_session_waits_for_stable_lanes() -> None:
    m = machine()
    m.begin(session(unlock_at=0.0))
    poll(m, 0.0, 30.25, False)
    assert m.session.phase is Phase.TIMED_OUT
    assert poll(m, 30.5, 60.0, False, stable=False) == []
    assert step(m, 60.25, False, stable=True) == [Settle(SID, timed_out=True)]


def test_latch_only_feedback_still_times_out() -> None:
    """Feedback open only while the latch is released is not an opening: the session times out."""
    m = machine()
    m.begin(session(unlock_at=0.0))
    assert poll(m, 0.0, 1.0, True) == []
    assert poll(m, 1.25, 30.0, False) == []
    pairs = poll(m, 30.25, 32.0, False)
    assert kinds(pairs) and set(kinds(pairs)) == {Settle}
    assert all(a == Settle(SID, timed_out=True) for _, a in pairs)


def test_unknown_feedback_does_not_prevent_timeout() -> None:
    m = machine()
    m.begin(session(unlock_at=0.0))
    poll(m, 0.0, 30.25, None)
    assert m.session.phase is Phase.TIMED_OUT


def test_after_end_session_nothing_more_happens() -> None:
    m = machine()
    m.begin(session(unlock_at=0.0))
    pairs = poll(m, 0.0, 32.0, False)
    assert pairs[0][1] == Settle(SID, timed_out=True)
    ended = m.end_session()
    assert ended is not None and ended.session_id == SID
    assert not m.busy
    assert poll(m, 32.25, 40.0, False) == []


def test_door_opened_after_timeout_is_forced_not_the_sessions_opening() -> None:
    m = machine()
    m.begin(session(unlock_at=0.0))
    poll(m, 0.0, 30.25, False)
    assert m.session.phase is Phase.TIMED_OUT
    actions = step(m, 30.5, True)
    assert DoorForced(1) in actions
    assert not any(isinstance(a, Opened) for a in actions)


# -- open, shut, settle (rules 3, 4) ----------------------------------------------------------
def test_open_shut_settle_only_after_settle_s_of_stable_lanes() -> None:
    m = machine()
    opened_session(m)
    assert poll(m, 1.5, 5.0, True) == []
    actions = step(m, 5.25, False)
    assert actions == [Closed(SID, wall(5.25))]
    assert m.session.phase is Phase.SETTLING
    assert m.session.closed_at == wall(5.25)
    assert m.is_open is False
    assert poll(m, 5.5, 6.5, False) == []           # < settle_s after the close
    assert step(m, 6.75, False) == [Settle(SID, timed_out=False)]  # exactly settle_s after it


def test_no_settle_while_lanes_unstable() -> None:
    m = machine()
    opened_session(m)
    assert step(m, 3.0, False) == [Closed(SID, wall(3.0))]
    assert poll(m, 3.25, 20.0, False, stable=False) == []
    assert m.session.phase is Phase.SETTLING
    assert step(m, 20.25, False, stable=True) == [Settle(SID, timed_out=False)]


def test_door_reopened_while_settling_goes_back_to_open() -> None:
    m = machine()
    opened_session(m)
    step(m, 3.0, False)
    assert step(m, 3.5, True) == [Reopened(SID)]
    s = m.session
    assert s.phase is Phase.OPEN
    assert s.closed_at is None and s.settle_from is None
    # open again: no settle however stable the lanes are
    assert poll(m, 3.75, 10.0, True) == []
    assert step(m, 10.25, False) == [Closed(SID, wall(10.25))]
    # settle_s counts from the new close, not the first one
    assert poll(m, 10.5, 11.5, False) == []
    assert step(m, 11.75, False) == [Settle(SID, timed_out=False)]


# -- door left open (rule 3) -----------------------------------------------------------------
def test_left_open_alarm_once_after_door_open_alarm_s_and_cleared_when_shut() -> None:
    m = machine()
    t_open = opened_session(m)  # open_since = 1.25
    assert poll(m, 1.5, t_open + 120.0, True) == []   # exactly door_open_alarm_s: not "longer than"
    actions = step(m, t_open + 120.25, True)
    assert len(actions) == 1 and isinstance(actions[0], LeftOpen)
    alarm = actions[0]
    assert alarm.door == 1 and alarm.session_id == SID
    assert alarm.open_s == pytest.approx(120.25, abs=0.06)
    assert m.left_open_alarm
    assert poll(m, t_open + 120.5, t_open + 300.0, True) == []  # once
    actions = step(m, t_open + 300.25, False)
    assert LeftOpenCleared(1) in actions and Closed(SID, wall(t_open + 300.25)) in actions
    assert not m.left_open_alarm
    assert not any(isinstance(a, LeftOpenCleared) for _, a in poll(m, t_open + 300.5, t_open + 301.0, False))


def test_left_open_alarm_without_session() -> None:
    m = machine()
    assert step(m, 0.0, True) == [DoorForced(1)]
    pairs = poll(m, 0.25, 121.0, True)
    assert [a for _, a in pairs] == [LeftOpen(1, None, pytest.approx(120.25, abs=0.06))]
    assert pairs[0][0] == 120.25


def test_left_open_alarm_again_after_the_door_was_shut_and_left_open_again() -> None:
    m = machine()
    step(m, 0.0, True)
    poll(m, 0.25, 121.0, True)
    assert step(m, 121.25, False) == [LeftOpenCleared(1)]
    t = 200.0
    assert step(m, t, True) == [DoorForced(1)]
    pairs = poll(m, t + 0.25, t + 121.0, True)
    assert kinds(pairs) == [LeftOpen]


# -- door forced (rule 7) ------------------------------------------------------------------------
def test_door_forced_once_per_opening() -> None:
    m = machine()
    assert step(m, 0.0, False) == []
    assert step(m, 0.25, True) == [DoorForced(1)]
    assert poll(m, 0.5, 10.0, True) == []
    assert step(m, 10.25, False) == []
    assert poll(m, 10.5, 11.0, False) == []
    assert step(m, 11.25, True) == [DoorForced(1)]


def test_door_forced_reports_the_machine_door_number() -> None:
    m = machine(door=7)
    assert step(m, 0.0, True) == [DoorForced(7)]


def test_no_forced_for_a_service_unlock_the_operator_opened() -> None:
    m = machine()
    step(m, 0.0, False)
    m.service_unlock(10.0)
    assert poll(m, 10.0, 11.0, True) == []   # latch window
    assert poll(m, 11.25, 60.0, True) == []  # after it: the operator has it open
    assert m.is_open is True
    assert step(m, 60.25, False) == []
    # the service opening is over once the door shut: opening it again is forced
    assert poll(m, 60.5, 61.0, False) == []
    assert step(m, 61.25, True) == [DoorForced(1)]


def test_service_unlock_not_opened_expires_then_opening_is_forced() -> None:
    m = machine()
    m.service_unlock(10.0)
    assert poll(m, 10.0, 12.0, False) == []
    assert not m.service_allowed
    assert step(m, 12.25, True) == [DoorForced(1)]


def test_service_unlock_does_not_create_a_session() -> None:
    m = machine()
    m.service_unlock(0.0)
    assert poll(m, 0.0, 5.0, True) == []
    assert m.session is None and not m.busy


# -- unknown feedback -------------------------------------------------------------------------
def test_unknown_feedback_changes_nothing_while_open() -> None:
    m = machine()
    opened_session(m)
    assert poll(m, 1.5, 10.0, None) == []
    assert m.session.phase is Phase.OPEN
    assert m.is_open is True
    assert m.session.closed_at is None
    assert step(m, 10.25, False) == [Closed(SID, wall(10.25))]


def test_unknown_feedback_with_no_session_is_not_forced() -> None:
    m = machine()
    assert poll(m, 0.0, 10.0, None) == []
    assert m.is_open is None


def test_unknown_feedback_keeps_a_forced_door_reported_once() -> None:
    m = machine()
    assert step(m, 0.0, True) == [DoorForced(1)]
    assert poll(m, 0.25, 5.0, None) == []
    assert step(m, 5.25, True) == []  # the same opening: None is not "shut"
    assert m.is_open is True


def test_unknown_feedback_does_not_clear_left_open_alarm() -> None:
    m = machine()
    step(m, 0.0, True)
    poll(m, 0.25, 121.0, True)
    assert m.left_open_alarm
    assert poll(m, 121.25, 130.0, None) == []
    assert m.left_open_alarm


# -- resume after a restart (rule 6) -------------------------------------------------------------
@pytest.mark.parametrize(
    ("opened_at", "closed_at", "phase"),
    [
        (None, None, Phase.WAIT_OPEN),
        (1_800_000_100.0, None, Phase.OPEN),
        (1_800_000_100.0, 1_800_000_160.0, Phase.SETTLING),
    ],
)
def test_resume_phase(opened_at: float | None, closed_at: float | None, phase: Phase) -> None:
    assert resume_phase(opened_at, closed_at) is phase


@pytest.mark.parametrize("unlocked_ago", [0.2, 600.0])
def test_resumed_open_session_whose_door_reads_shut_settles(unlocked_ago: float) -> None:
    now = 1000.0
    m = machine()
    m.begin(session(unlock_at=now - unlocked_ago, phase=Phase.OPEN, opened_at=wall(now - unlocked_ago + 1)))
    assert step(m, now, False) == [Closed(SID, wall(now))]
    assert m.session.phase is Phase.SETTLING
    assert poll(m, now + 0.25, now + 1.25, False) == []
    assert step(m, now + 1.5, False) == [Settle(SID, timed_out=False)]


def test_resumed_settling_session_settles_without_a_second_close() -> None:
    now = 500.0
    m = machine()
    m.begin(session(unlock_at=now - 100, phase=Phase.SETTLING, opened_at=wall(410.0), closed_at=wall(450.0),
                    settle_from=now))
    assert poll(m, now, now + 1.25, False) == []
    assert step(m, now + 1.5, False) == [Settle(SID, timed_out=False)]


def test_resumed_open_session_still_open_is_not_opened_again() -> None:
    now = 1000.0
    m = machine()
    m.begin(session(unlock_at=now - 600, phase=Phase.OPEN, opened_at=wall(400.0)))
    assert poll(m, now, now + 5.0, True) == []
    assert step(m, now + 5.25, False) == [Closed(SID, wall(now + 5.25))]


def test_begin_twice_is_refused() -> None:
    m = machine()
    m.begin(session())
    with pytest.raises(DoorBusy, match="door 1 already has session"):
        m.begin(ActiveSession(session_id="other", door=1, shopper="x", unlock_at=1.0))
    assert m.session.session_id == SID


# -- properties ------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    close_after=st.floats(min_value=0.0, max_value=50.0, allow_nan=False),
    polls=st.lists(
        st.tuples(st.floats(min_value=0.01, max_value=0.4, allow_nan=False), st.booleans()),
        min_size=1, max_size=40,
    ),
)
def test_settle_never_before_settle_s_after_close_nor_on_unstable_lanes(
    close_after: float, polls: list[tuple[float, bool]]
) -> None:
    m = machine()
    opened_session(m)
    t_close = 1.5 + close_after
    assert step(m, t_close, False) == [Closed(SID, wall(t_close))]
    t = t_close
    expected_first: float | None = None
    got_first: float | None = None
    for gap, stable in polls:
        t += gap
        actions = m.step(t, wall(t), False, stable)
        if expected_first is None and stable and t - t_close >= TIMING.settle_s:
            expected_first = t
        settles = [a for a in actions if isinstance(a, Settle)]
        if settles:
            assert stable and t - t_close >= TIMING.settle_s
            assert settles == [Settle(SID, timed_out=False)]
            got_first = t if got_first is None else got_first
    assert got_first == expected_first


def test_unstable_lanes_do_not_hang_a_session_forever() -> None:
    m = machine()
    opened_session(m)
    assert step(m, 3.0, False) == [Closed(SID, wall(3.0))]
    give_up = m.timing.settle_s + m.timing.give_up_s
    assert poll(m, 3.25, 3.0 + give_up - 0.25, False, stable=False) == []
    assert step(m, 3.0 + give_up, False, stable=False) == [Settle(SID, timed_out=False, weigh=True)]


def test_a_timed_out_session_with_unstable_lanes_ends_unweighed() -> None:
    m = machine()
    m.begin(session(unlock_at=0.0))
    poll(m, 0.0, 30.25, False, stable=False)
    assert m.session.phase is Phase.TIMED_OUT
    start = m.session.settle_from
    give_up = m.timing.settle_s + m.timing.give_up_s
    assert poll(m, 30.5, start + give_up - 0.25, False, stable=False) == []
    assert step(m, start + give_up, False, stable=False) == [Settle(SID, timed_out=True, weigh=False)]


def test_service_unlock_survives_ticks_between_polls() -> None:
    """Timer-only steps (no reading) after the latch window must not withdraw the service
    allowance before a poll has seen whether the operator opened the door."""
    m = machine()
    m.service_unlock(0.0)
    for t in (0.25, 0.5, 0.75, 1.0, 1.05, 1.1):
        assert step(m, t, None) == []
    assert step(m, 1.15, True) == []          # the first poll after the window sees it open
    assert m.service_allowed
    assert step(m, 3.0, False) == []          # shut again: the allowance ends
    assert step(m, 3.5, True) == [DoorForced(1)]


def test_a_resumed_session_is_not_timed_out_before_its_door_was_read() -> None:
    """Rule 6: the open timeout ran out while the agent was down; the first step comes before
    the first door reading, which shows the door open: it is the shopper's session, not forced."""
    t = Timing(latch_release_s=0.5, open_timeout_s=30.0, settle_s=1.0)
    m = DoorMachine(1, t)
    m.begin(ActiveSession("s-1", 1, "ref", unlock_at=-100.0, door_read=False))
    assert m.step(0.0, 1000.0, None, True) == []          # timers only, no reading yet
    assert m.session is not None and m.session.phase is Phase.WAIT_OPEN
    actions = m.step(0.1, 1000.1, True, True)
    assert actions == [Opened("s-1", 1000.1)] and m.session.phase is Phase.OPEN
