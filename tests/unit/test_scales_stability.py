"""Stability judgement with explicit fake times (no clock, no sleeps)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.scales.stability import StabilityWindow

DIV = 0.1  # d = 1
SETTLE = 1.0
POLL = 0.25  # exact in binary floating point, so window edges are exact


def feed(w: StabilityWindow, t0: float, t1: float, grams: float, motion: bool = False) -> float:
    """Readings every POLL from t0 up to and including t1; returns the last time fed."""
    n = round((t1 - t0) / POLL)
    t = t0
    for i in range(n + 1):
        t = t0 + i * POLL
        w.add(t, grams, motion, DIV)
    return t


def test_stable_after_settle_s_of_quiet_readings() -> None:
    w = StabilityWindow(SETTLE)
    feed(w, 0.0, 1.0, 250.0)
    assert w.is_stable(1.0)
    assert w.value == 250.0


def test_not_stable_before_settle_s_of_history() -> None:
    w = StabilityWindow(SETTLE)
    assert not w.is_stable(0.0)
    feed(w, 0.0, 0.75, 250.0)
    assert not w.is_stable(0.75)
    assert not w.is_stable(0.99)
    w.add(1.0, 250.0, False, DIV)
    assert w.is_stable(1.0)


def test_single_reading_becomes_stable_only_when_it_covers_the_window() -> None:
    w = StabilityWindow(SETTLE)
    w.add(5.0, 10.0, False, DIV)
    assert not w.is_stable(5.5)
    assert w.is_stable(6.0)


def test_not_stable_with_a_motion_bit_in_the_window() -> None:
    w = StabilityWindow(SETTLE)
    feed(w, 0.0, 2.0, 250.0)
    assert w.is_stable(2.0)
    w.add(2.25, 250.0, True, DIV)  # motion bit, same weight: the bit alone decides
    feed(w, 2.5, 3.25, 250.0)
    assert not w.is_stable(2.25)
    assert not w.is_stable(3.0)
    assert not w.is_stable(3.25)  # the moving reading is the anchor of [2.25, 3.25]
    w.add(3.5, 250.0, False, DIV)
    assert w.is_stable(3.5)


def test_stable_again_after_motion_ends_plus_settle_s() -> None:
    w = StabilityWindow(SETTLE)
    feed(w, 0.0, 1.0, 100.0)
    assert w.is_stable(1.0)
    feed(w, 1.25, 2.0, 180.0, motion=True)  # a hand on the shelf
    first_quiet = 2.25
    verdicts = {}
    t = first_quiet
    while t <= 4.0:
        w.add(t, 150.0, False, DIV)
        verdicts[t] = w.is_stable(t)
        t += POLL
    assert verdicts == {t: t >= first_quiet + SETTLE for t in verdicts}
    assert verdicts[3.25] and not verdicts[3.0]
    assert w.value == 150.0


def test_spread_of_two_divisions_is_stable_more_is_not() -> None:
    w = StabilityWindow(SETTLE)
    for i, g in enumerate([13.2, 13.3, 13.4, 13.2, 13.4]):
        w.add(i * POLL, g, False, DIV)
    assert w.is_stable(1.0)  # 13.4 - 13.2 is 0.20000000000000107 in floats: still 2 divisions

    w = StabilityWindow(SETTLE)
    for i, g in enumerate([13.2, 13.5, 13.3, 13.3, 13.3]):  # t = 0, 0.25, ..., 1.0
        w.add(i * POLL, g, False, DIV)
    assert not w.is_stable(1.0)  # 13.5 - 13.2: 3 divisions
    w.add(1.25, 13.3, False, DIV)
    assert w.is_stable(1.25)  # anchor is 13.5 at 0.25: 13.5 - 13.3 = 2 divisions
    w.add(1.5, 13.6, False, DIV)
    assert not w.is_stable(1.5)  # anchor 13.3 at 0.5, now 13.6: 3 divisions


def test_spread_measured_in_the_readings_own_division() -> None:
    w = StabilityWindow(SETTLE)
    w.add(0.0, 5.0, False, 1.0)  # d = 0
    w.add(0.5, 7.0, False, 1.0)
    w.add(1.0, 6.0, False, 1.0)
    assert w.is_stable(1.0)
    w.add(1.5, 8.5, False, 1.0)
    assert not w.is_stable(1.5)


def test_reset_forgets_history() -> None:
    w = StabilityWindow(SETTLE)
    feed(w, 0.0, 1.0, 250.0)
    assert w.is_stable(1.0)
    w.reset()
    assert w.value is None
    assert not w.is_stable(1.0)
    w.add(1.1, 250.0, False, DIV)
    assert not w.is_stable(1.1)
    assert w.is_stable(2.1)


def test_value_is_the_latest_reading_not_the_mean() -> None:
    w = StabilityWindow(SETTLE)
    for i, g in enumerate([10.0, 10.1, 10.2, 10.1, 10.2]):
        w.add(i * 0.25, g, False, DIV)
    assert w.value == 10.2


def test_memory_is_bounded_and_keeps_the_anchor() -> None:
    w = StabilityWindow(SETTLE)
    for i in range(10_000):
        w.add(i * 0.01, 1.0, False, DIV)
    # 1 s of readings at 100 Hz plus the anchor just before the window.
    assert len(w) <= 102
    assert w.is_stable(9999 * 0.01)


def test_max_gap_rejects_a_transmitter_that_went_quiet() -> None:
    w = StabilityWindow(SETTLE, max_gap_s=0.5)
    feed(w, 0.0, 1.0, 250.0)
    assert w.is_stable(1.0)
    assert w.is_stable(1.4)
    assert not w.is_stable(1.6)  # no reading for 0.6 s
    without = StabilityWindow(SETTLE)
    feed(without, 0.0, 1.0, 250.0)
    assert without.is_stable(1.6)


def test_readings_must_not_go_back_in_time() -> None:
    w = StabilityWindow(SETTLE)
    w.add(1.0, 0.0, False, DIV)
    with pytest.raises(ValueError):
        w.add(0.5, 0.0, False, DIV)


@given(
    st.lists(
        st.tuples(st.floats(0.01, 0.5), st.integers(-3, 3), st.booleans()),
        min_size=1,
        max_size=60,
    ),
    st.floats(0.0, 0.5),
)
def test_matches_brute_force_definition(steps: list[tuple[float, int, bool]], extra: float) -> None:
    """Incremental window (with pruning) == the definition evaluated over full history."""
    w = StabilityWindow(SETTLE)
    history: list[tuple[float, float, bool]] = []
    t = 0.0
    for dt, counts, motion in steps:
        t += dt
        grams = 100.0 + counts * DIV
        w.add(t, grams, motion, DIV)
        history.append((t, grams, motion))
        for now in (t, t + extra):
            start = now - SETTLE
            before = [h for h in history if h[0] <= start]
            if not before:
                expected = False
            else:
                judged = [before[-1]] + [h for h in history if start < h[0] <= now]
                gs = [h[1] for h in judged]
                expected = not any(h[2] for h in judged) and round((max(gs) - min(gs)) / DIV) <= 2
            assert w.is_stable(now) == expected
