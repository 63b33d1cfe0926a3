"""Sampler determinism, PII masking, interval summaries, the clock sanity check, and the
recorder's non-blocking queues."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from agent.config import TelemetryConfig
from agent.telemetry.clock import CLOCK_FLOOR_UNIX_NS, CheckedClock
from agent.telemetry.recorder import TelemetryRecorder
from agent.telemetry.sampler import MASKED, IntervalSummary, is_sampled, mask_pii

S = 1_000_000_000
T0 = CLOCK_FLOOR_UNIX_NS + 1000 * S


def test_sampling_is_deterministic_by_seq_and_near_the_rate() -> None:
    picked = [s for s in range(200_000) if is_sampled(s, 0.01)]
    assert picked == [s for s in range(200_000) if is_sampled(s, 0.01)]
    assert 1800 < len(picked) < 2200
    # Consecutive seqs are not picked in runs: the hash spreads them.
    assert len(set(np.diff(picked))) > 100
    assert not any(is_sampled(s, 0.0) for s in range(1000))
    assert all(is_sampled(s, 1.0) for s in range(1000))
    # A higher rate keeps every seq a lower rate kept (same hash, bigger threshold).
    assert set(picked) <= {s for s in range(200_000) if is_sampled(s, 0.05)}


def test_pii_mask_by_name_at_any_depth_and_by_dotted_path() -> None:
    meta = {
        "Plate": "AB-123",
        "camera": {"owner": "Alice", "id": 3, "plate": "X"},
        "frames": [{"plate": "Y", "ok": 1}],
        "owner": "kept",
    }
    masked = mask_pii(meta, ["plate", "camera.owner"])
    assert masked == {
        "Plate": MASKED,
        "camera": {"owner": MASKED, "id": 3, "plate": MASKED},
        "frames": [{"plate": MASKED, "ok": 1}],
        "owner": "kept",
    }
    assert meta["Plate"] == "AB-123"  # the caller's data is not changed


def test_interval_summary_percentiles_and_histograms() -> None:
    rng = np.random.default_rng(1)
    lat = rng.gamma(2.0, 0.002, size=997)
    summary = IntervalSummary(T0, 0)
    for i, latency in enumerate(lat):
        summary.observe(float(latency), i % 3, (i % 10) / 10 + 0.05)
    summary.observe_temps({"cpu": 50.0})
    summary.observe_temps({"cpu": 61.5})
    out = summary.finish(T0 + 10 * S, 10 * S, {"cpu": 55.0}, "soft", 7.5)
    assert out["frames"] == 997 and out["fps"] == 99.7
    assert out["latency_p99_ms"] == round(float(np.percentile(lat * 1000, 99)), 4)
    assert out["latency_p50_ms"] < out["latency_p95_ms"] < out["latency_p99_ms"]
    assert out["class_counts"] == {"0": 333, "1": 332, "2": 332}
    assert sum(out["confidence_counts"]) == 997 and out["confidence_counts"][0] == 100
    assert out["temps_max_c"] == {"cpu": 61.5} and out["governor_state"] == "soft"


class FakeClocks:
    def __init__(self, wall: int) -> None:
        self.wall = wall
        self.mono = 5 * S

    def step(self, seconds: float, wall_jump_s: float = 0.0) -> None:
        self.mono += int(seconds * S)
        self.wall += int((seconds + wall_jump_s) * S)


def test_backward_jump_is_recorded_and_not_trusted() -> None:
    fake = FakeClocks(T0)
    clock = CheckedClock(lambda: fake.wall, lambda: fake.mono)
    first = clock.now()
    assert first.clock_ok and first.time_unix_ns == T0
    fake.step(1.0, wall_jump_s=-3600)
    back = clock.now()
    assert not back.clock_ok
    assert back.time_unix_ns == T0 + S  # last good time + monotonic time
    assert back.observed_unix_ns == T0 + S - 3600 * S  # the raw reading is kept
    jumps = clock.take_jumps()
    assert len(jumps) == 1 and jumps[0].delta_ns == -3600 * S
    fake.step(1.0)
    assert not clock.now().clock_ok and clock.take_jumps() == []  # reported once
    fake.step(1.0, wall_jump_s=3600)  # the wall clock is corrected back
    again = clock.now()
    assert again.clock_ok and again.time_unix_ns == T0 + 3 * S


def test_clock_before_the_floor_then_ntp_sync() -> None:
    fake = FakeClocks(0)  # a Raspberry Pi with no RTC boots in 1970
    clock = CheckedClock(lambda: fake.wall, lambda: fake.mono)
    early = clock.now()
    assert not early.clock_ok and early.time_unix_ns == CLOCK_FLOOR_UNIX_NS
    fake.step(2.0)
    fake.wall = T0  # NTP sync: a forward jump to a plausible time is accepted, and noted
    synced = clock.now()
    assert synced.clock_ok and synced.time_unix_ns == T0
    assert len(clock.take_jumps()) == 1


def test_recorder_stamps_rows_and_records_clock_jumps(tmp_path: Path) -> None:
    fake = FakeClocks(T0)
    db = tmp_path / "telemetry.db"
    recorder = TelemetryRecorder(
        TelemetryConfig(flush_interval_s=0.02),
        "dev",
        db,
        boot_id="boot",
        start_uploader=False,
        wall_ns=lambda: fake.wall,
        monotonic_ns=lambda: fake.mono,
        clock=CheckedClock(lambda: fake.wall, lambda: fake.mono),
    )
    recorder.event("daemon.start", {})
    assert recorder.flush()
    fake.step(1.0, wall_jump_s=-7200)
    recorder.event("governor.step", {"state": "soft"})
    assert recorder.flush()
    recorder.close()
    with sqlite3.connect(db) as conn:
        got = conn.execute(
            "SELECT name, time_unix_ns, clock_ok FROM records ORDER BY id"
        ).fetchall()
    by_name = {name: (t, ok) for name, t, ok in got}
    assert by_name["daemon.start"] == (T0, 1)
    assert by_name["governor.step"] == (T0 + S, 0)
    assert "clock.jump" in by_name


def test_full_queue_drops_observations_first_and_counts(tmp_path: Path) -> None:
    cfg = TelemetryConfig(queue_max=100, flush_interval_s=60.0, sample_rate=1.0)
    recorder = TelemetryRecorder(cfg, "dev", tmp_path / "t.db", boot_id="b", start_uploader=False)
    # The writer sleeps for flush_interval_s between cycles, so the queue fills.
    time.sleep(0.05)
    for seq in range(1000):
        recorder.observe_inference(seq, 0.001, 1, 0.9, {})
    recorder.event("ota.state", {"state": "COMMITTED"})
    assert recorder.dropped["observations"] >= 800
    assert recorder.dropped["events"] == 0
    recorder.close()
    with sqlite3.connect(tmp_path / "t.db") as conn:
        counters = dict(conn.execute("SELECT name, value FROM counters"))
        names = [r[0] for r in conn.execute("SELECT name FROM records WHERE type='event'")]
        summary = conn.execute("SELECT attrs FROM records WHERE type='summary'").fetchone()
    assert counters["dropped_queue.observation"] == recorder.dropped["observations"]
    assert names == ["ota.state"]
    assert '"dropped_queue.observation":' in summary[0]  # losses are themselves reported
