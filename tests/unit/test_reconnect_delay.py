"""The link's reconnect policy (agent.mqtt_link.reconnect_delay): full jitter, spread after a lost connection."""

from __future__ import annotations

import collections
import random

import pytest

from agent.mqtt_link import backoff_delay, reconnect_delay


def test_without_a_loss_it_is_the_full_jitter_backoff_draw_for_draw() -> None:
    a, b = random.Random(7), random.Random(7)
    for attempt in range(25):
        assert reconnect_delay(attempt, after_loss=False, spread_s=20, rng=a) == backoff_delay(attempt, rng=b)


def test_a_cabinet_that_never_connected_retries_within_half_a_second_first() -> None:
    rng = random.Random(1)
    first = [reconnect_delay(0, after_loss=False, spread_s=20, rng=rng) for _ in range(1000)]
    assert max(first) <= 0.5 and min(first) >= 0


def test_after_a_loss_every_retry_window_is_at_least_the_spread() -> None:
    rng = random.Random(2)
    for attempt in range(8):      # the exponential window (0.5 * 2**k) is below 20 s up to k = 5
        draws = [reconnect_delay(attempt, after_loss=True, spread_s=20, rng=rng) for _ in range(2000)]
        window = max(20.0, min(60.0, 0.5 * 2 ** attempt))
        assert 0 <= min(draws) and max(draws) <= window
        assert max(draws) > 0.95 * window           # the whole window is used ...
        assert abs(sum(draws) / len(draws) - window / 2) < 0.05 * window    # ... uniformly


def test_the_spread_may_exceed_the_cap_and_zero_turns_it_off() -> None:
    rng = random.Random(3)
    assert max(reconnect_delay(0, after_loss=True, cap_s=60, spread_s=120, rng=rng) for _ in range(500)) > 100
    a, b = random.Random(4), random.Random(4)
    assert [reconnect_delay(k, after_loss=True, spread_s=0, rng=a) for k in range(10)] == \
        [backoff_delay(k, rng=b) for k in range(10)]


@pytest.mark.parametrize("outage_s", [0.7, 3.0])
def test_a_fleet_that_lost_its_broker_together_comes_back_spread_out(outage_s: float) -> None:
    """1,000 cabinets lose the broker at t = 0; it is back at ``outage_s`` (refused before). With the
    default spread no second holds more than 10 % of the fleet's attempts, and every cabinet is back
    within about the spread after the broker; with the plain backoff a second holds most of them."""
    def storm(spread_s: float, seed: int) -> tuple[float, float]:
        rng = random.Random(seed)
        per_s: collections.Counter[int] = collections.Counter()
        last_back = 0.0
        for _ in range(1000):
            t, attempt = 0.0, 0
            while True:
                t += reconnect_delay(attempt, after_loss=True, spread_s=spread_s, rng=rng)
                attempt += 1
                per_s[int(t)] += 1
                if t >= outage_s:
                    last_back = max(last_back, t - outage_s)
                    break
        return max(per_s.values()) / 1000, last_back

    for seed in range(5):
        peak, last_back = storm(20.0, seed)
        assert peak <= 0.10, (seed, peak)
        assert last_back <= 20.0
        assert storm(0.0, seed)[0] > 0.5
