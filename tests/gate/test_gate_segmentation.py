"""Segmentation golden sets through run_gate (mIoU check), and reference outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import GoldenSetError
from agent.ota.golden import run_gate


def _seg_model(path: Path, bias: tuple[float, float]) -> Path:
    """Per-pixel 2-class logits from a 1x1 conv: class 1 where the pixel is bright."""
    weight = np.array([[[[-4.0]]], [[[4.0]]]], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["logits"])],
        "seg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array(bias, dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def seg_golden(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (40, 1, 6, 6)).astype(np.float32)
    labels = (x[:, 0] > 0.5).astype(np.int64)
    labels[:, 0, 0] = 255  # ignored pixels
    folder = tmp_path / "seg"
    folder.mkdir()
    np.save(folder / "inputs.npy", x)
    np.save(folder / "labels.npy", labels)
    return folder


def test_segmentation_passes_for_the_same_model_and_fails_on_miou(tmp_path, seg_golden):
    good = _seg_model(tmp_path / "good.onnx", (2.0, -2.0))
    same = _seg_model(tmp_path / "same.onnx", (2.0, -2.0))
    shifted = _seg_model(tmp_path / "shifted.onnx", (2.0, -3.2))  # class 1 needs x > 0.65
    ok = run_gate(good, same, seg_golden, policy={"latency_p95_slack_ms": 1000.0})
    assert ok.passed, ok.format_table()
    assert ok.metrics["task"] == "segmentation"
    assert ok.metrics["candidate"]["miou"] == pytest.approx(1.0)
    bad = run_gate(good, shifted, seg_golden, policy={"latency_p95_slack_ms": 1000.0})
    assert [c.name for c in bad.failed_checks] == ["miou"]
    assert bad.metrics["candidate"]["miou"] < 0.9


def test_segmentation_label_out_of_range_is_refused(tmp_path, seg_golden):
    labels = np.load(seg_golden / "labels.npy")
    labels[3, 2, 2] = 7
    np.save(seg_golden / "labels.npy", labels)
    model = _seg_model(tmp_path / "m.onnx", (2.0, -2.0))
    with pytest.raises(GoldenSetError, match="label 7 is out of range"):
        run_gate(model, model, seg_golden)


def test_reference_outputs_are_compared(make_golden, demo_models, golden_dir):
    from agent.runtime import load_backend

    x = np.load(golden_dir / "inputs.npy")
    reference = load_backend(demo_models / "digits_fp32.onnx").predict(x)
    folder = make_golden(reference=reference.astype(np.float32))
    report = run_gate(demo_models / "digits_fp32.onnx", demo_models / "digits_int8.onnx", folder)
    ref = report.metrics["reference"]
    assert ref["baseline"]["top1_agreement"] == 1.0
    assert 0.95 < ref["candidate"]["top1_agreement"] < 1.0
    assert report.golden["reference"] is True
