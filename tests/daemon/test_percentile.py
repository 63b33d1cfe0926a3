"""The agent's one percentile (agent.pipeline.latency): np.percentile's value, row by row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from agent.pipeline.latency import latency_summary_ms, percentile, sorted_percentile
from agent.runtime.bench import latency_summary_ms as bench_summary


@dataclass(frozen=True)
class Row:
    """Samples (any order) and a q in percent; ``want`` None: np.percentile's value."""

    id: str
    samples: tuple[float, ...]
    q: float
    want: float | None = None


ROWS = [
    Row("one sample, q=0", (3.5,), 0.0, 3.5),
    Row("one sample, q=50", (3.5,), 50.0, 3.5),
    Row("one sample, q=100", (3.5,), 100.0, 3.5),
    Row("two, q=0 is the smaller", (2.0, 1.0), 0.0, 1.0),
    Row("two, q=100 is the larger", (2.0, 1.0), 100.0, 2.0),
    Row("two, q=50 halfway", (1.0, 2.0), 50.0, 1.5),
    Row("two, q=95 near the top", (1.0, 2.0), 95.0, 1.95),
    Row("ties: a flat stretch stays exact", (0.1, 0.1, 0.1, 0.1), 95.0, 0.1),
    Row("ties below an outlier", (0.1, 0.1, 0.1, 9.0), 50.0, 0.1),
    Row("q=1 of three", (0.3, 0.1, 0.2), 1.0),
    Row("q=99 of five, unsorted", (5.0, 1.0, 4.0, 2.0, 3.0), 99.0),
    Row("p95 of 480 latencies", tuple(np.random.default_rng(7).gamma(2.0, 1e-3, 480)), 95.0),
    Row("p99 of 128 latencies", tuple(np.random.default_rng(8).random(128)), 99.0),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_percentile_is_numpys(row: Row) -> None:
    want = float(np.percentile(np.asarray(row.samples), row.q))
    if row.want is not None:
        assert want == pytest.approx(row.want)  # the row's own figure is numpy's too
    # the same position and interpolation as numpy: equal to the last bit
    assert percentile(row.samples, row.q) == want
    assert sorted_percentile(sorted(row.samples), row.q) == want


@dataclass(frozen=True)
class Refused:
    id: str
    samples: tuple[float, ...]
    q: float
    message: str


REFUSED = [
    Refused("no samples", (), 50.0, "no samples"),
    Refused("q below 0", (1.0, 2.0), -1.0, "outside 0..100"),
    Refused(
        "q above 100 (a fraction scale mistaken for percent the other way)",
        (1.0,),
        101.0,
        "outside 0..100",
    ),
]


@pytest.mark.parametrize("row", REFUSED, ids=[r.id for r in REFUSED])
def test_percentile_refuses(row: Refused) -> None:
    with pytest.raises(ValueError, match=row.message):
        percentile(row.samples, row.q)


def test_latency_summary_ms_is_numpys_in_ms() -> None:
    lat_s = np.random.default_rng(3).gamma(2.0, 2e-3, 333)
    got = latency_summary_ms(lat_s.tolist())
    ms = lat_s * 1000.0
    for q in (50, 95, 99):
        assert got[f"p{q}_ms"] == pytest.approx(float(np.percentile(ms, q)), rel=1e-12)
    assert got["mean_ms"] == pytest.approx(float(ms.mean()), rel=1e-12)
    # `edge-agent bench` reports through the same helper
    assert bench_summary(lat_s.tolist()) == got


def test_latency_summary_ms_of_nothing_is_zeros() -> None:
    assert latency_summary_ms([]) == {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
