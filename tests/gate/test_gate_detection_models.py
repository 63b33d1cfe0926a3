"""The detection gate end to end on the shipped shapes detectors, checked against pycocotools."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from agent.cli import main
from agent.errors import GoldenSetError
from agent.ota.gate_data import load_golden_set
from agent.ota.gate_detection import ImageBoxes, coco_detection_metrics
from agent.ota.golden import run_gate
from agent.pipeline.detection import decode_batch, detection_spec_from_mapping
from agent.runtime import load_backend


@pytest.fixture(scope="module")
def det_golden(repo_root: Path) -> Path:
    return repo_root / "golden_local" / "detection"


@pytest.fixture()
def no_latency_golden(tmp_path: Path, det_golden: Path) -> Path:
    """The detection golden set with a latency limit no busy CI box can miss: these tests
    judge the detection checks, never wall-clock speed."""
    copy = tmp_path / "golden"
    shutil.copytree(det_golden, copy)
    policy = (copy / "policy.yaml").read_text()
    (copy / "policy.yaml").write_text(
        policy.replace("latency_p95_ratio_max: 1.2", "latency_p95_ratio_max: 1000")
    )
    return copy


def pycocotools_metrics(
    gt: list[ImageBoxes], dets: list[ImageBoxes], names: tuple[str, ...]
) -> dict[str, Any]:
    """mAP@0.5:0.95, mAP@0.5 and per-class AP@0.5 from pycocotools on the same boxes."""
    images, anns, results = [], [], []
    for img_id, (g, d) in enumerate(zip(gt, dets), start=1):
        images.append({"id": img_id, "width": 64, "height": 64})
        for box, cls in zip(np.asarray(g.boxes).tolist(), np.asarray(g.classes).tolist()):
            x1, y1, x2, y2 = box
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        assert d.scores is not None
        for box, cls, score in zip(
            np.asarray(d.boxes, dtype=float).tolist(),
            np.asarray(d.classes).tolist(),
            np.asarray(d.scores, dtype=float).tolist(),
        ):
            x1, y1, x2, y2 = box
            results.append(
                {
                    "image_id": img_id,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
        }
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_class = {}
    for k in range(len(names)):
        p = ev.eval["precision"][0, :, k, 0, -1]  # IoU 0.5, area "all", maxDets 100
        if (p > -1).any():
            per_class[str(k)] = float(np.mean(p[p > -1]))
    return {"map50_95": float(ev.stats[0]), "map50": float(ev.stats[1]), "per_class": per_class}


def decoded_golden(model: Path, golden_dir: Path) -> tuple[list[ImageBoxes], list[ImageBoxes]]:
    golden = load_golden_set(golden_dir)
    backend = load_backend(model)
    try:
        outputs = np.concatenate(
            [backend.run(golden.inputs[i : i + 1])[0] for i in range(golden.rows)]
        )
    finally:
        backend.close()
    spec = detection_spec_from_mapping(golden.detection, "detection.yaml")
    found = decode_batch([outputs], spec, (64, 64))
    assert golden.boxes is not None
    return list(golden.boxes), [ImageBoxes(d.boxes, d.classes, d.scores) for d in found]


@pytest.mark.parametrize(
    "model", ["shapes_det_fp32.onnx", "shapes_det_int8.onnx", "shapes_det_int8.tflite"]
)
def test_map_matches_pycocotools_on_the_golden_set(
    model: str, demo_models: Path, det_golden: Path
) -> None:
    gt, dets = decoded_golden(demo_models / model, det_golden)
    ours = coco_detection_metrics(gt, dets, 3)
    ref = pycocotools_metrics(gt, dets, ("square", "circle", "triangle"))
    assert ours["map50"] == pytest.approx(ref["map50"], abs=1e-9)
    assert ours["map50_95"] == pytest.approx(ref["map50_95"], abs=1e-9)
    assert ours["per_class_ap50"] == pytest.approx(ref["per_class"], abs=1e-9)
    # a real detector: far from both trivial ends
    assert 0.5 < ours["map50"] < 1.0 and ours["map50_95"] < ours["map50"]


def test_map_matches_pycocotools_with_ties_misses_and_a_class_without_detections() -> None:
    rng = np.random.default_rng(5)
    gt, dets = [], []
    for _ in range(12):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 40, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(6, 20, (n, 2))], axis=1)
        classes = rng.integers(0, 2, n)  # class 2 has ground truth nowhere ...
        gt.append(ImageBoxes(boxes, classes))
        # ... detections: jittered copies (some below IoU 0.5), duplicates, false positives
        jitter = boxes + rng.normal(0, 2.5, boxes.shape)
        extra = rng.uniform(0, 50, (2, 2))
        d_boxes = np.concatenate([jitter, jitter[:1], np.concatenate([extra, extra + 8], 1)])
        d_cls = np.concatenate([classes, classes[:1], rng.integers(0, 3, 2)])
        d_scores = np.round(rng.uniform(0, 1, len(d_cls)), 1)  # rounded: many ties
        dets.append(ImageBoxes(d_boxes, d_cls, d_scores))
    ours = coco_detection_metrics(gt, dets, 3)
    ref = pycocotools_metrics(gt, dets, ("a", "b", "c"))
    assert ours["map50"] == pytest.approx(ref["map50"], abs=1e-9)
    assert ours["map50_95"] == pytest.approx(ref["map50_95"], abs=1e-9)
    assert ours["per_class_ap50"] == pytest.approx(ref["per_class"], abs=1e-9)
    assert "2" not in ours["per_class_ap50"]  # no ground truth: left out, as pycocotools


def _gate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["gate", *args])
    return code, capsys.readouterr().out


def test_int8_detector_passes_with_map_checks_in_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], demo_models: Path, no_latency_golden: Path
) -> None:
    report = tmp_path / "gate.json"
    code, out = _gate(
        capsys,
        "--baseline",
        str(demo_models / "shapes_det_fp32.onnx"),
        "--candidate",
        str(demo_models / "shapes_det_int8.onnx"),
        "--golden",
        str(no_latency_golden),
        "--report",
        str(report),
    )
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "gate PASS"
    data = json.loads(report.read_text())
    checks = {c["name"]: c for c in data["checks"]}
    assert {"map50", "map50_95", "class_ap", "latency_p95", "memory"} <= set(checks)
    assert checks["map50"]["verdict"] == "pass" and "mAP@0.5 " in checks["map50"]["detail"]
    assert data["golden"]["task"] == "detection"
    assert data["metrics"]["baseline"]["gt_boxes"] == 253
    assert data["metrics"]["detection"]["candidate"]["layout"] == "yolo"


def test_lowered_class_fails_naming_the_class(
    capsys: pytest.CaptureFixture[str], demo_models: Path, no_latency_golden: Path
) -> None:
    code, out = _gate(
        capsys,
        "--baseline",
        str(demo_models / "shapes_det_fp32.onnx"),
        "--candidate",
        str(demo_models / "shapes_det_lowered.onnx"),
        "--golden",
        str(no_latency_golden),
    )
    assert code == 3
    last = out.strip().splitlines()[-1]
    assert last.startswith("gate FAIL") and "class 2 (triangle) AP@0.5" in last


def test_a_package_detection_block_decides_how_its_model_is_read(
    tmp_path: Path, demo_models: Path, no_latency_golden: Path
) -> None:
    # The same model bytes, but the package asks for a 0.9 score threshold: fewer boxes,
    # a lower mAP at that operating point, and the report shows which spec was used.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shutil.copy(demo_models / "shapes_det_fp32.onnx", pkg / "model.onnx")
    data = (pkg / "model.onnx").read_bytes()
    manifest = {
        "format": 1,
        "name": "shapes",
        "version": "1.0.1",
        "release_counter": 2,
        "created": "2026-12-01T00:00:00Z",
        "task": "detection",
        "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 64, 64]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [None, 64, 8]}],
        "detection": {"layout": "yolo", "box_units": "normalized", "score_threshold": 0.9},
        "files": [
            {"path": "model.onnx", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        ],
    }
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    report = run_gate(demo_models / "shapes_det_fp32.onnx", pkg, no_latency_golden)
    spec = report.metrics["detection"]["candidate"]
    assert spec["score_threshold"] == 0.9
    assert report.metrics["candidate"]["det_boxes"] < report.metrics["baseline"]["det_boxes"]
    assert "map50" in report.to_dict()["failed"]


@dataclass(frozen=True)
class BadAnnotations:
    name: str
    change: Callable[[dict[str, Any]], None]
    error: str


def _drop_image(d: dict[str, Any]) -> None:
    d["images"].pop()


def _bad_bbox(d: dict[str, Any]) -> None:
    d["annotations"][0]["bbox"] = [1, 2, -3, 4]


def _unknown_category(d: dict[str, Any]) -> None:
    d["annotations"][0]["category_id"] = 99


def _unknown_image(d: dict[str, Any]) -> None:
    d["annotations"][0]["image_id"] = 9999


def _crowd(d: dict[str, Any]) -> None:
    d["annotations"][0]["iscrowd"] = 1


def _no_categories(d: dict[str, Any]) -> None:
    d["categories"] = []


BAD_ANNOTATIONS = [
    BadAnnotations("one-image-missing", _drop_image, "127 images for 128 inputs"),
    BadAnnotations("negative-width", _bad_bbox, r"annotations\[0\]\.bbox"),
    BadAnnotations("unknown-category", _unknown_category, r"category_id: no category 99"),
    BadAnnotations("unknown-image", _unknown_image, r"image_id: no image 9999"),
    BadAnnotations("crowd-region", _crowd, "crowd regions are not supported"),
    BadAnnotations("no-categories", _no_categories, "categories: empty"),
]


@pytest.mark.parametrize("case", BAD_ANNOTATIONS, ids=[c.name for c in BAD_ANNOTATIONS])
def test_bad_annotations_are_refused_naming_the_entry(
    case: BadAnnotations, tmp_path: Path, det_golden: Path
) -> None:
    copy = tmp_path / "golden"
    shutil.copytree(det_golden, copy)
    data = json.loads((copy / "annotations.json").read_text())
    case.change(data)
    (copy / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(GoldenSetError, match=case.error):
        load_golden_set(copy)


def test_not_json_annotations_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], demo_models: Path, det_golden: Path
) -> None:
    copy = tmp_path / "golden"
    shutil.copytree(det_golden, copy)
    (copy / "annotations.json").write_bytes(b"{not json")
    model = str(demo_models / "shapes_det_fp32.onnx")
    code = main(["gate", "--baseline", model, "--candidate", model, "--golden", str(copy)])
    assert code == 2
    assert "annotations.json: not valid JSON" in capsys.readouterr().err


def ssd_from_yolo(src: Path, dst: Path) -> Path:
    """The shapes detector with TFLite-style SSD outputs appended: boxes [N,64,4] (y1, x1,
    y2, x2 in 0..1), classes [N,64], scores [N,64], count [N]: the same boxes, another
    layout."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    del g.output[:]

    def const(name: str, values: list[int]) -> None:
        g.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))

    const("ax2", [2])
    for name, lo, hi in (("cx", 0, 1), ("cy", 1, 2), ("w", 2, 3), ("h", 3, 4), ("s_obj", 4, 5)):
        const(f"{name}_lo", [lo])
        const(f"{name}_hi", [hi])
        g.node.append(
            helper.make_node("Slice", ["output", f"{name}_lo", f"{name}_hi", "ax2"], [name])
        )
    const("cls_lo", [5])
    const("cls_hi", [8])
    g.node.append(helper.make_node("Slice", ["output", "cls_lo", "cls_hi", "ax2"], ["s_cls"]))
    g.initializer.append(numpy_helper.from_array(np.array([0.5], np.float32), "half"))
    g.node.extend(
        [
            helper.make_node("Mul", ["w", "half"], ["hw"]),
            helper.make_node("Mul", ["h", "half"], ["hh"]),
            helper.make_node("Sub", ["cy", "hh"], ["y1"]),
            helper.make_node("Sub", ["cx", "hw"], ["x1"]),
            helper.make_node("Add", ["cy", "hh"], ["y2"]),
            helper.make_node("Add", ["cx", "hw"], ["x2"]),
            helper.make_node("Concat", ["y1", "x1", "y2", "x2"], ["boxes"], axis=2),
            helper.make_node("Mul", ["s_cls", "s_obj"], ["s_cls_scores"]),
            helper.make_node("ReduceMax", ["s_cls_scores"], ["scores"], axes=[2], keepdims=0),
            helper.make_node("ArgMax", ["s_cls_scores"], ["cls_i"], axis=2, keepdims=0),
            helper.make_node("Cast", ["cls_i"], ["classes"], to=TensorProto.FLOAT),
        ]
    )
    # count: every box is real here (the decoder's threshold still applies)
    const("ax1", [1])
    g.node.extend(
        [
            helper.make_node("Mul", ["scores", "zero_f"], ["zeros"]),
            helper.make_node("Add", ["zeros", "one_f"], ["ones"]),
            helper.make_node("ReduceSum", ["ones", "ax1"], ["count"], keepdims=0),
        ]
    )
    g.initializer.append(numpy_helper.from_array(np.array([0.0], np.float32), "zero_f"))
    g.initializer.append(numpy_helper.from_array(np.array([1.0], np.float32), "one_f"))
    for name, shape in (
        ("boxes", ["N", 64, 4]),
        ("classes", ["N", 64]),
        ("scores", ["N", 64]),
        ("count", ["N"]),
    ):
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(dst))
    return dst


def test_a_yolo_detector_replaced_by_an_ssd_one_is_gated_on_its_boxes(
    tmp_path: Path, demo_models: Path, no_latency_golden: Path
) -> None:
    model = ssd_from_yolo(demo_models / "shapes_det_fp32.onnx", tmp_path / "model.onnx")
    data = model.read_bytes()
    manifest = {
        "format": 1,
        "name": "shapes",
        "version": "2.0.0",
        "release_counter": 3,
        "created": "2026-12-01T00:00:00Z",
        "task": "detection",
        "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 64, 64]}],
        "outputs": [
            {"name": "boxes", "dtype": "float32", "shape": [None, 64, 4]},
            {"name": "classes", "dtype": "float32", "shape": [None, 64]},
            {"name": "scores", "dtype": "float32", "shape": [None, 64]},
            {"name": "count", "dtype": "float32", "shape": [None]},
        ],
        "detection": {"layout": "ssd", "score_threshold": 0.25},
        "files": [
            {"path": "model.onnx", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = run_gate(demo_models / "shapes_det_fp32.onnx", tmp_path, no_latency_golden)
    base, cand = report.metrics["baseline"], report.metrics["candidate"]
    assert report.metrics["detection"]["candidate"]["layout"] == "ssd"
    # the same boxes in another layout: the same mAP (float rounding of the corners aside)
    assert cand["det_boxes"] == base["det_boxes"]
    assert cand["map50"] == pytest.approx(base["map50"], abs=1e-6)
    assert cand["map50_95"] == pytest.approx(base["map50_95"], abs=1e-3)
    assert report.passed, report.format_table()
