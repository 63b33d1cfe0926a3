"""Drift of the live model from its golden baseline: the math row by row, alarm and recorder."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.config import TelemetryConfig
from agent.errors import ConfigError
from agent.ota.gate_policy import load_policy
from agent.telemetry.drift import (
    DriftAlarm,
    DriftPolicy,
    GoldenBaseline,
    drift_figures,
    golden_baseline,
    kl,
    load_drift_policy,
    psi,
)
from agent.telemetry.recorder import TelemetryRecorder
from agent.telemetry.status import read_drift


@dataclass(frozen=True)
class MathRow:
    id: str
    golden: tuple[int, ...]
    live: tuple[int, ...]
    psi_min: float
    psi_max: float


MATH_ROWS = [
    MathRow("identical", (10, 20, 30, 40), (10, 20, 30, 40), 0.0, 0.0),
    MathRow("same shape, other size", (10, 20, 30, 40), (100, 200, 300, 400), 0.0, 0.01),
    MathRow("small shift", (25, 25, 25, 25), (30, 25, 25, 20), 0.0, 0.05),
    MathRow("disjoint", (50, 50, 0, 0), (0, 0, 50, 50), 5.0, math.inf),
    # without smoothing ln(0) would make these infinite
    MathRow("empty golden bins", (100, 0, 0, 0), (97, 1, 1, 1), 0.01, 1.0),
    MathRow("empty live bins", (25, 25, 25, 25), (100, 0, 0, 0), 1.0, math.inf),
    MathRow("one class only, same", (120,), (500,), 0.0, 1e-9),
    MathRow("one class golden, another live", (120, 0), (0, 500), 5.0, math.inf),
    MathRow("no live frames", (10, 10), (0, 0), 0.0, 1e-9),
]


@pytest.mark.parametrize("row", MATH_ROWS, ids=lambda r: r.id)
def test_psi_and_kl_rows(row: MathRow) -> None:
    value = psi(row.golden, row.live)
    assert math.isfinite(value)
    assert row.psi_min <= value <= row.psi_max
    divergence = kl(row.golden, row.live)
    assert math.isfinite(divergence) and divergence >= -1e-12
    # PSI is the symmetric sum of both KL directions
    assert value == pytest.approx(kl(row.golden, row.live) + kl(row.live, row.golden))


def test_histograms_of_other_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="3 and 2 bins"):
        psi((1, 2, 3), (1, 2))


def test_golden_baseline_bins_like_the_summary() -> None:
    # logits: rows 0-2 say class 1 confidently, row 3 class 0 barely
    logits = np.array([[0, 9, 0], [0, 9, 0], [0, 9, 0], [0.1, 0, 0]], dtype=np.float32)
    base = golden_baseline(logits)
    assert base.class_counts == (1, 3, 0)
    # softmax 0.9997 -> bin 9; 0.355 -> bin 3 (the summary's int(conf * 10))
    assert base.confidence_counts == (0, 0, 0, 1, 0, 0, 0, 0, 0, 3)
    assert GoldenBaseline.from_dict(base.to_dict()) == base
    probs = np.array([[0.2, 0.8], [0.65, 0.35]], dtype=np.float32)
    assert golden_baseline(probs).confidence_counts[8] == 1  # already probabilities


def test_live_classes_the_baseline_lacks_share_one_bin() -> None:
    base = GoldenBaseline((50, 50), (0,) * 9 + (100,))
    same = drift_figures(base, {0: 500, 1: 500}, [0] * 9 + [1000])
    assert same.class_psi == pytest.approx(0.0, abs=1e-3) and same.frames == 1000
    unknown = drift_figures(base, {0: 250, 1: 250, -1: 500}, [0] * 9 + [1000])
    assert unknown.frames == 1000 and unknown.class_psi > 1.0


@pytest.mark.parametrize(
    "bad",
    [{"class_counts": [1], "confidence_counts": [1] * 9}, {"class_counts": "x"}, {}],
    ids=["nine-bins", "not-a-list", "empty"],
)
def test_malformed_stored_baselines_are_unknown(bad: dict[str, object]) -> None:
    assert GoldenBaseline.from_dict(bad) is None


def test_alarm_fires_once_per_crossing() -> None:
    policy = DriftPolicy(psi_max=0.25, min_frames=10)
    alarm = DriftAlarm()
    seen = [alarm.update(v, policy, 100) for v in (0.1, 0.3, 0.4, 0.2, 0.5, 0.6)]
    assert seen == [False, True, False, False, True, False]
    # a summary with too few frames is not judged either way
    assert DriftAlarm().update(9.0, policy, 5) is False


def test_policy_yaml_drift_section(tmp_path: Path, repo_root: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        (repo_root / "golden_local" / "policy.yaml").read_text()
        + "drift:\n  psi_max: 0.1\n  min_frames: 20\n"
    )
    assert load_drift_policy(path) == DriftPolicy(psi_max=0.1, min_frames=20)
    # the gate reads the same file and leaves the section to telemetry
    assert load_policy(path).agreement_min == 0.98
    assert load_drift_policy(tmp_path / "missing.yaml") == DriftPolicy()
    path.write_text("drift:\n  psi_max: -1\n")
    with pytest.raises(ConfigError, match="psi_max"):
        load_drift_policy(path)
    path.write_text("drift:\n  psi_maximum: 0.2\n")
    with pytest.raises(ConfigError, match="psi_maximum"):
        load_drift_policy(path)


class FakeMonotonic:
    """The recorder's monotonic clock, moved by the test: a summary is due when it says."""

    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns


def _rows(db_path: Path, name: str) -> list[dict[str, object]]:
    with sqlite3.connect(db_path) as conn:
        return [
            json.loads(r[0])
            for r in conn.execute("SELECT attrs FROM records WHERE name = ? ORDER BY seq", (name,))
        ]


def _interval(
    recorder: TelemetryRecorder, clock: FakeMonotonic, classes: list[int], version: str, db: Path
) -> None:
    """One summary interval of live results, ended by moving the clock past it; returns
    once its summary is written (so the next interval's frames are not in it)."""
    before = len(_rows(db, "inference.summary"))
    meta = {"model": "digits", "version": version}
    for seq, cls in enumerate(classes):
        recorder.observe_inference(seq, 0.001, cls, 0.95, meta)
    assert recorder.flush()
    clock.ns += 61_000_000_000  # past summary_interval_s
    _wait_for_summaries(recorder, db, before + 1)


def test_summaries_carry_drift_and_one_event_per_crossing(tmp_path: Path) -> None:
    db = tmp_path / "telemetry.db"
    clock = FakeMonotonic()
    cfg = TelemetryConfig(sample_rate=0.0, summary_interval_s=60.0, flush_interval_s=0.01)
    recorder = TelemetryRecorder(
        cfg, "dev", db, boot_id="b", start_uploader=False, monotonic_ns=clock
    )
    golden = GoldenBaseline((50,) * 10, (0,) * 9 + (500,))
    recorder.set_drift_baseline("digits", "1.1.0", golden, DriftPolicy(0.25, 50))
    balanced = [i % 10 for i in range(200)]
    skewed = [3] * 150 + balanced[:50]  # class 3 everywhere: the live data moved
    try:
        for classes in (balanced, skewed, skewed, balanced, skewed):
            _interval(recorder, clock, classes, "1.1.0", db)
        drifts = [s["drift"] for s in _rows(db, "inference.summary")]
        assert [d["over"] for d in drifts] == [False, True, True, False, True]
        assert drifts[0]["class_psi"] < 0.05 and drifts[1]["class_psi"] > 0.25
        assert drifts[1]["frames"] == 200 and drifts[1]["psi_max"] == 0.25
        events = _rows(db, "model.drift")
        assert len(events) == 2  # two crossings, not three drifted summaries
        assert events[0]["version"] == "1.1.0" and events[0]["class_psi"] > 0.25
        since = recorder.drift_since_live("digits", "1.1.0")
        assert since is not None and since.frames == 1000
        assert recorder.drift_since_live("digits", "1.0.0") is None
    finally:
        recorder.close()
    last = read_drift(db)
    assert last is not None and last["over"] is True and last["version"] == "1.1.0"


def test_still_drifted_after_a_restart_is_not_a_new_crossing(tmp_path: Path) -> None:
    db = tmp_path / "telemetry.db"
    golden = GoldenBaseline((50,) * 10, (0,) * 9 + (500,))
    skewed = [3] * 200
    for _ in range(2):
        clock = FakeMonotonic()
        cfg = TelemetryConfig(sample_rate=0.0, summary_interval_s=60.0, flush_interval_s=0.01)
        recorder = TelemetryRecorder(
            cfg, "dev", db, boot_id="b", start_uploader=False, monotonic_ns=clock
        )
        recorder.set_drift_baseline("digits", "1.1.0", golden, DriftPolicy(0.25, 50))
        try:
            _interval(recorder, clock, skewed, "1.1.0", db)
        finally:
            recorder.close()
    assert len(_rows(db, "inference.summary")) == 2
    assert len(_rows(db, "model.drift")) == 1


def test_a_model_without_baseline_has_no_drift(tmp_path: Path) -> None:
    db = tmp_path / "telemetry.db"
    clock = FakeMonotonic()
    cfg = TelemetryConfig(sample_rate=0.0, summary_interval_s=60.0, flush_interval_s=0.01)
    recorder = TelemetryRecorder(
        cfg, "dev", db, boot_id="b", start_uploader=False, monotonic_ns=clock
    )
    recorder.set_drift_baseline("digits", "1.0.0", None, DriftPolicy())
    try:
        _interval(recorder, clock, [1] * 100, "1.0.0", db)
    finally:
        recorder.close()
    assert "drift" not in _rows(db, "inference.summary")[0]
    assert read_drift(db) is None


def _wait_for_summaries(recorder: TelemetryRecorder, db: Path, count: int) -> None:
    for _ in range(2000):
        if db.exists() and len(_rows(db, "inference.summary")) >= count:
            return
        recorder._wake.set()  # the writer sees the summary is due when it wakes
        recorder.flush(0.05)
    raise AssertionError(f"fewer than {count} summaries written")
