"""Which frames are decoded (drivers.camera.schedule), with a fake clock: idle costs nothing,
a moving scene is decoded at a bounded rate, a scene coming to rest at once."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.camera import synth
from drivers.camera.schedule import DecodeScheduler

SIZE = (640, 480)
FPS = 10.0


def noisy_scene(n: int, scene: int = 7) -> list[np.ndarray]:
    return [synth.empty_frame(SIZE, seed=100 + i, noise_sigma=8.0, scene_seed=scene) for i in range(n)]


def moving_scene(n: int) -> list[np.ndarray]:
    """A dark bar sweeping across a fixed scene: every frame differs from the previous one."""
    base = synth.empty_frame(SIZE, seed=1, noise_sigma=0.0, scene_seed=3)
    out = []
    for i in range(n):
        f = base.copy()
        x = (i * 37) % (SIZE[0] - 120)
        f[:, x:x + 120] = 30
        out.append(f)
    return out


def run(sched: DecodeScheduler, frames: list[np.ndarray], cost_s: float = 0.01, t0: float = 0.0) -> list[float]:
    """Offer the frames at FPS; return the times of the frames decoded."""
    decoded = []
    for i, f in enumerate(frames):
        now = t0 + i / FPS
        if sched.offer(f, now):
            sched.done(cost_s)
            decoded.append(now)
    return decoded


def test_an_idle_noisy_scene_is_decoded_only_to_settle_and_to_refresh() -> None:
    sched = DecodeScheduler(settle_frames=2, refresh_s=5.0)
    decoded = run(sched, noisy_scene(120))  # 12 s
    assert decoded[:3] == pytest.approx([0.0, 0.1, 0.2])  # the first frame and two settling ones
    assert len(decoded) == 3 + 2  # then one refresh every 5 s
    assert all(5.0 - 1e-9 <= gap <= 5.0 + 1.5 / FPS for gap in np.diff(decoded[2:]))


def test_a_moving_scene_is_decoded_at_most_every_interval() -> None:
    sched = DecodeScheduler(moving_interval_s=0.25, duty=0.1)
    decoded = run(sched, moving_scene(100), cost_s=0.01)
    gaps = np.diff(decoded)
    assert len(decoded) <= 10 / 0.25 + 1
    assert gaps.min() >= 0.25 - 1e-9
    assert len(decoded) >= 10 / 0.3 - 1  # and not much less often: a code in view is seen several times a second


def test_expensive_decodes_are_spaced_by_the_duty_cycle() -> None:
    sched = DecodeScheduler(moving_interval_s=0.25, duty=0.1)
    decoded = run(sched, moving_scene(100), cost_s=0.08)  # 80 ms each: at most 10 % of the time
    assert np.diff(decoded).min() >= 0.8 - 1e-9
    assert sched.skipped_busy > 0


def test_a_scene_coming_to_rest_is_decoded_at_once() -> None:
    sched = DecodeScheduler(moving_interval_s=0.25)
    moving = moving_scene(7)
    rest = [moving[-1]] * 5
    decoded = run(sched, moving + rest, cost_s=0.01)
    assert pytest.approx(0.7) in decoded  # the first frame at rest
    assert not sched.stale


def test_a_changed_scene_not_decoded_yet_is_stale() -> None:
    sched = DecodeScheduler(moving_interval_s=10.0)
    frames = moving_scene(3)
    assert sched.offer(frames[0], 0.0)
    sched.done(0.01)
    assert not sched.offer(frames[1], 0.1)  # moving, within the interval
    assert sched.stale


def test_disabled_decodes_everything() -> None:
    sched = DecodeScheduler(enabled=False)
    assert len(run(sched, noisy_scene(5))) == 5


def test_bad_duty_rejected() -> None:
    with pytest.raises(ValueError):
        DecodeScheduler(duty=0.0)


def test_without_budget_only_the_scene_decides() -> None:
    """A glob played for a test: expensive decodes do not make it skip a scene."""
    sched = DecodeScheduler(moving_interval_s=0.25, duty=0.1)
    moving = moving_scene(3)
    decoded = []
    for i, f in enumerate([moving[0], moving[1], moving[1]]):
        if sched.offer(f, i / FPS, budget=False):
            sched.done(1.0)  # a second per decode
            decoded.append(i)
    assert decoded == [0, 2]  # the moving frame within the interval is skipped, the rest frame is not
