"""The live latency window: percentiles of the last N samples, however often it is read."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.pipeline.latency import LatencyWindow, sorted_percentile


def expected_ms(samples: list[float], size: int) -> dict[str, float]:
    window = np.asarray(samples[-size:], dtype=np.float64)
    out = {f"p{q}": float(np.percentile(window, q)) * 1000.0 for q in (50, 95, 99)}
    out["mean"] = float(window.mean()) * 1000.0
    return out


def assert_matches(got: dict[str, float | None], want: dict[str, float]) -> None:
    for key, value in want.items():
        got_value = got[key]
        assert got_value is not None, key
        assert got_value == pytest.approx(round(value, 3), abs=1.5e-3), key


def test_sorted_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 10, 2048):
        ordered = np.sort(rng.random(n))
        for q in (0.0, 50.0, 95.0, 99.0, 100.0):
            expect = float(np.percentile(ordered, q))
            assert abs(sorted_percentile(ordered, q) - expect) < 1e-12
            assert abs(sorted_percentile(ordered.tolist(), q) - expect) < 1e-12


def test_empty_window_has_no_figures() -> None:
    assert LatencyWindow(8).summary_ms() == {"p50": None, "p95": None, "p99": None, "mean": None}


@pytest.mark.parametrize("size", [1, 7, 64, 2048])
def test_matches_numpy_over_the_last_samples_whatever_the_read_pattern(size: int) -> None:
    # reads after 0..3*size samples in uneven steps: both the incremental path (a few new
    # samples) and the rebuild path (many new, or the window wrapped) are taken
    rng = np.random.default_rng(size)
    window = LatencyWindow(size)
    samples: list[float] = []
    for step in [1, 2, 1, size // 8 + 1, 3, size, 5, 1, 2 * size + 3, 1, 1, 9]:
        for value in rng.gamma(2.0, 0.002, step):
            samples.append(float(value))
            window.add(float(value))
        assert_matches(window.summary_ms(), expected_ms(samples, size))
        assert len(window) == min(len(samples), size)


def test_duplicates_and_eviction_keep_the_sorted_copy_exact() -> None:
    # equal latencies are common (timer granularity); evicting one must remove one copy
    window = LatencyWindow(16)
    samples = [0.001, 0.002, 0.001, 0.003] * 40
    for i, value in enumerate(samples):
        window.add(value)
        if i % 3 == 0:
            assert_matches(window.summary_ms(), expected_ms(samples[: i + 1], 16))


def test_a_reader_that_looks_once_a_while_later_sees_the_newest_window() -> None:
    window = LatencyWindow(100)
    for value in range(1, 10_001):
        window.add(value / 1e6)
    summary = window.summary_ms()
    # the newest 100 samples: 9901..10000 us
    assert summary["p50"] == pytest.approx(9.9505, abs=1e-3)
    assert summary["mean"] == pytest.approx(9.9505, abs=1e-3)


def test_concurrent_add_and_read_lose_nothing() -> None:
    window = LatencyWindow(4096)
    done = threading.Event()
    summaries: list[dict[str, float | None]] = []

    def reader() -> None:
        while not done.is_set():
            summaries.append(window.summary_ms())

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(4000):
        window.add(0.001 if i % 2 else 0.003)
    done.set()
    thread.join()
    assert len(window) == 4000
    assert window.summary_ms()["mean"] == pytest.approx(2.0, abs=1e-9)
    assert summaries  # the reader ran alongside the writer


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        LatencyWindow(0)
