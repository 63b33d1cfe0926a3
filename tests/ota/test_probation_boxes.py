"""Probation of a detector: live boxes per frame and box scores against the gate's golden-set
figures; a collapse (no boxes, sunk scores) fails with the figures in the reason."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from demo_models import shapes_inputs
from onnx import numpy_helper

from agent.config import PreprocessConfig
from agent.demo.shapes import SHAPE_CLASSES, shapes_frames
from agent.ota.golden import run_gate
from agent.ota.probation import Baseline, ProbationPolicy, ProbationWatch, Verdict
from agent.pipeline.detection import row_result
from agent.runtime import load_backend

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN = REPO_ROOT / "golden_local" / "detection"
MODELS = REPO_ROOT / "agent" / "demo" / "models"
FRAMES = 120
POLICY = ProbationPolicy(min_frames=FRAMES, min_s=0.0)
# the demo detector's package schema (tools/demo_ota.sh): what the daemon decodes with
PRE = dataclasses.replace(
    PreprocessConfig(),
    task="detection",
    detection_layout="yolo",
    box_units="normalized",
    score_threshold=0.25,
    iou_threshold=0.45,
)


def scaled_scores(path: Path, factor: float) -> Path:
    """The shapes detector with every class's scores multiplied by ``factor`` (built from
    shapes_det_lowered.onnx, whose `lowered` factor covers the triangle class only)."""
    model = onnx.load(str(MODELS / "shapes_det_lowered.onnx"))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "lowered":
            factor_all = np.full(numpy_helper.to_array(init).shape, factor, np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(factor_all, "lowered"))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def gate_baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """What probation holds the new model to: the figures of a real passing gate
    (FP32 -> INT8 on the golden set; latency is not what this file tests)."""
    report = run_gate(
        MODELS / "shapes_det_fp32.onnx",
        MODELS / "shapes_det_int8.onnx",
        GOLDEN,
        policy={"latency_p95_ratio_max": 1000.0, "map50_95_drop_max_pp": 2.0},
    )
    assert report.passed, report.format_table()
    return Baseline.from_gate_report(report.to_dict())


def live_frames() -> np.ndarray:
    """Frames of the daemon's synthetic shapes source, as the detector's input."""
    return shapes_inputs(shapes_frames(FRAMES, seed=123))


@dataclasses.dataclass(frozen=True)
class LiveRow:
    """What the new release (its model bytes) or the camera (its frames) controls."""

    id: str
    model: Callable[[Path], Path]
    frames: Callable[[], np.ndarray]
    verdict: Verdict
    reason: str


ROWS = [
    LiveRow("int8-release", lambda _: MODELS / "shapes_det_int8.onnx", live_frames,
            Verdict.PASSED, "boxes a frame"),
    LiveRow("fp32-release", lambda _: MODELS / "shapes_det_fp32.onnx", live_frames,
            Verdict.PASSED, "boxes a frame"),
    # one class of three gone is not a collapse: the gate's class_ap check refuses it
    LiveRow("one-class-lowered", lambda _: MODELS / "shapes_det_lowered.onnx", live_frames,
            Verdict.PASSED, "boxes a frame"),
    LiveRow("scores-x0.2-no-boxes", lambda d: scaled_scores(d / "m.onnx", 0.2), live_frames,
            Verdict.FAILED, "boxes per frame 0.00 under"),
    LiveRow("scores-x0.3-sunk-to-the-threshold", lambda d: scaled_scores(d / "m.onnx", 0.3),
            live_frames, Verdict.FAILED, "mean box score"),
    LiveRow("camera-sends-black-frames", lambda _: MODELS / "shapes_det_int8.onnx",
            lambda: np.zeros_like(live_frames()), Verdict.FAILED, "boxes per frame 0.00 under"),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_live_boxes_are_held_to_the_gates_figures(
    row: LiveRow, gate_baseline: Baseline, tmp_path: Path
) -> None:
    assert gate_baseline.boxes_per_frame is not None and gate_baseline.boxes_per_frame > 1.0
    assert gate_baseline.box_score_mean is not None and gate_baseline.box_score_mean > 0.6
    backend = load_backend(row.model(tmp_path))
    watch = ProbationWatch(POLICY, gate_baseline, started_s=0.0)
    result = None
    try:
        for x in row.frames():
            outputs = backend.run(x[None])
            res = row_result(outputs, PRE, SHAPE_CLASSES, 0, (64, 64))
            watch.observe(0.001, res.confidence, res.box_scores)
            result = watch.judge(1.0)
            if result.verdict is not Verdict.PENDING:
                break
    finally:
        backend.close()
    assert result is not None
    assert result.verdict is row.verdict, result.reason
    assert row.reason in result.reason, result.reason
    assert result.frames == FRAMES  # judged once probation had its frames, not on one frame
    assert result.boxes_per_frame is not None
    if row.verdict is Verdict.FAILED:
        # the gate's figure is in the reason, so an operator sees what it was held to
        figure = (
            gate_baseline.boxes_per_frame
            if "boxes per frame" in row.reason
            else gate_baseline.box_score_mean
        )
        assert f"the gate's {figure:.{2 if 'boxes' in row.reason else 3}f}" in result.reason


def test_box_figures_survive_the_journal_and_old_rows_turn_the_check_off(
    gate_baseline: Baseline,
) -> None:
    # the journal keeps the baseline as a dict; reading it back keeps the box figures
    saved = Baseline.from_gate_report({"probation_baseline": gate_baseline.to_dict()})
    assert saved == gate_baseline
    # a row written before box figures existed (or a classifier's) has none: no box check
    old = Baseline.from_gate_report({"probation_baseline": {"latency_p50_ms": 1.0}})
    assert old.boxes_per_frame is None and old.box_score_mean is None
    watch = ProbationWatch(POLICY, old, started_s=0.0)
    for _ in range(FRAMES):
        watch.observe(0.001, 0.0, ())
    result = watch.judge(1.0)
    assert result.verdict is Verdict.PASSED and result.boxes_per_frame == 0.0
    # a classifier's gate report carries no detection figures
    classifier = Baseline.from_gate_report(
        {"metrics": {"task": "classification", "candidate": {"boxes_per_image": 3.0}}}
    )
    assert classifier.boxes_per_frame is None
