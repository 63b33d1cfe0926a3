"""The FPS cap paces by deadlines on an injected clock: no drift, no burst, no busy wait."""

from __future__ import annotations

import pytest

from agent.pipeline.scheduler import FrameScheduler


class FakeClock:
    """A clock that only moves when the code under test sleeps or the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "the scheduler must never sleep zero or negative time"
        self.sleeps.append(seconds)
        self.now += seconds


def run_frames(sched: FrameScheduler, clock: FakeClock, n: int, work_s: float) -> list[float]:
    starts = []
    for _ in range(n):
        sched.wait()
        starts.append(clock.now)
        clock.now += work_s
    return starts


def test_deadlines_do_not_drift_with_inference_time() -> None:
    clock = FakeClock()
    sched = FrameScheduler(10.0, clock=clock, sleep=clock.sleep)
    starts = run_frames(sched, clock, 101, work_s=0.03)
    # 100 periods of 0.1 s: exactly 10 s, whatever the inference took
    assert starts[-1] - starts[0] == pytest.approx(10.0, abs=1e-9)
    assert all(s == pytest.approx(0.07) for s in clock.sleeps)


def test_naive_sleep_loop_would_drift_but_deadlines_do_not() -> None:
    # the contrast the benchmark measures: run(); sleep(1/fps) is slow by the work time
    naive_elapsed = 100 * (0.1 + 0.03)
    clock = FakeClock()
    sched = FrameScheduler(10.0, clock=clock, sleep=clock.sleep)
    starts = run_frames(sched, clock, 101, work_s=0.03)
    assert starts[-1] - starts[0] < naive_elapsed - 2.9


def test_a_late_frame_is_caught_up_without_resync() -> None:
    clock = FakeClock()
    sched = FrameScheduler(10.0, clock=clock, sleep=clock.sleep)
    sched.wait()
    clock.now += 0.15  # late by half a period
    sched.wait()  # deadline 1000.1 passed: runs at once
    assert not clock.sleeps
    assert sched.late_frames == 1
    clock.now += 0.01
    d = sched.wait()  # the schedule is kept: next deadline 1000.2
    assert d == pytest.approx(1000.2)
    assert sched.resyncs == 0


def test_a_stall_resyncs_instead_of_bursting() -> None:
    clock = FakeClock()
    sched = FrameScheduler(10.0, clock=clock, sleep=clock.sleep)
    sched.wait()
    clock.now += 2.0  # stalled for 20 periods
    first = sched.wait()
    assert first == pytest.approx(1002.0)
    assert sched.resyncs == 1
    # no burst of 20 catch-up frames: the next one waits a full period
    second = sched.wait()
    assert second == pytest.approx(1002.1)
    assert clock.sleeps == [pytest.approx(0.1)]


def test_uncapped_never_sleeps() -> None:
    clock = FakeClock()
    sched = FrameScheduler(0.0, clock=clock, sleep=clock.sleep)
    run_frames(sched, clock, 50, work_s=0.001)
    assert clock.sleeps == []


def test_set_cap_applies_from_the_next_frame() -> None:
    clock = FakeClock()
    sched = FrameScheduler(10.0, clock=clock, sleep=clock.sleep)
    sched.wait()
    sched.set_cap(5.0)
    assert sched.wait() == pytest.approx(1000.2)
    assert sched.wait() == pytest.approx(1000.4)
    sched.set_cap(20.0)
    assert sched.wait() == pytest.approx(1000.45)


def test_batch_pays_for_every_frame() -> None:
    clock = FakeClock()
    sched = FrameScheduler(10.0, clock=clock, sleep=clock.sleep)
    sched.wait()
    sched.charge(3)  # a batch of 4 frames
    assert sched.wait() == pytest.approx(1000.4)


def test_restart_after_pause_starts_a_new_schedule() -> None:
    clock = FakeClock()
    sched = FrameScheduler(10.0, clock=clock, sleep=clock.sleep)
    sched.wait()
    sched.restart()
    clock.now += 5.0
    assert sched.wait() == pytest.approx(1005.0)
    assert sched.resyncs == 0
