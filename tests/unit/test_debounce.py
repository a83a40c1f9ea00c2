"""Debounce with a fake clock: the same code within 2 s is one scan; the window slides."""

from __future__ import annotations

import pytest

from drivers.camera.debounce import Debouncer


def test_first_sighting_is_a_scan_repeats_within_window_are_not() -> None:
    d = Debouncer(2.0)
    assert d.seen("A", 100.0) is True
    assert d.seen("A", 100.5) is False
    assert d.seen("A", 101.9) is False


def test_other_codes_are_independent() -> None:
    d = Debouncer(2.0)
    assert d.seen("A", 0.0)
    assert d.seen("B", 0.1)
    assert not d.seen("A", 0.2)
    assert not d.seen("B", 0.3)


def test_code_out_of_sight_for_the_window_counts_again() -> None:
    d = Debouncer(2.0)
    assert d.seen("A", 10.0)
    assert d.seen("A", 12.0)  # exactly 2 s later: not "within" 2 s
    assert not d.seen("A", 13.99)
    assert d.seen("A", 16.5)


def test_window_slides_while_the_code_stays_in_view() -> None:
    d = Debouncer(2.0)
    t = 0.0
    scans = 0
    while t < 10.0:  # held in front of the camera for 10 s at 10 fps
        scans += d.seen("A", t)
        t += 0.1
    assert scans == 1
    last = t - 0.1
    assert not d.seen("A", last + 1.9)  # still within 2 s of the last sighting
    assert d.seen("A", last + 1.9 + 2.0)  # gone for 2 s, back: a new scan


def test_forgotten_entries_do_not_grow_without_bound() -> None:
    d = Debouncer(2.0)
    for i in range(1000):
        assert d.seen(f"code-{i}", float(i))
    assert len(d._last) <= 4


def test_negative_window_rejected() -> None:
    with pytest.raises(ValueError):
        Debouncer(-1.0)
