"""The manifest's `detection` block: accepted, round-tripped, and each bad value named."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from agent.errors import ManifestError
from agent.package.manifest import parse_manifest


def _manifest(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": 1,
        "name": "shapes",
        "version": "1.0.0",
        "release_counter": 1,
        "created": "2026-12-01T00:00:00Z",
        "task": "detection",
        "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 64, 64]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [None, 64, 8]}],
        "detection": {"layout": "yolo", "box_units": "normalized", "score_threshold": 0.25},
        "files": [{"path": "model.onnx", "sha256": "0" * 64, "size": 1}],
    }
    data.update(changes)
    return data


def test_a_detection_block_round_trips() -> None:
    m = parse_manifest(json.dumps(_manifest()).encode())
    assert m.detection == {"layout": "yolo", "box_units": "normalized", "score_threshold": 0.25}
    again = parse_manifest(json.dumps(m.to_dict()).encode())
    assert again.detection == m.detection


@dataclass(frozen=True)
class BadBlock:
    name: str
    changes: dict[str, Any]
    error: str


SSD_OUTPUTS = [
    {"name": n, "dtype": "float32", "shape": s}
    for n, s in (("boxes", [1, 10, 4]), ("classes", [1, 10]), ("scores", [1, 10]), ("n", [1]))
]
BAD = [
    BadBlock("unknown-layout", {"detection": {"layout": "retina"}}, "detection.layout: expected"),
    BadBlock("no-layout", {"detection": {"score_threshold": 0.3}}, "detection.layout: missing"),
    BadBlock("score-above-1", {"detection": {"layout": "yolo", "score_threshold": 2}}, "outside"),
    BadBlock("iou-zero", {"detection": {"layout": "yolo", "iou_threshold": 0}}, "outside"),
    BadBlock("no-boxes", {"detection": {"layout": "yolo", "max_detections": 0}}, "1..10000"),
    BadBlock("units", {"detection": {"layout": "yolo", "box_units": "mm"}}, "box_units: expected"),
    BadBlock("unknown-key", {"detection": {"layout": "yolo", "nms": 1}}, "detection.nms: unknown"),
    BadBlock("classifier", {"task": "classification"}, "only for task 'detection'"),
    BadBlock("ssd-one-output", {"detection": {"layout": "ssd"}}, r"ssd needs 3\+ outputs"),
    BadBlock(
        "yolo-on-ssd-outputs",
        {"detection": {"layout": "yolo"}, "outputs": SSD_OUTPUTS[1:2]},
        "needs an output of rank 3",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_detection_blocks_are_refused_naming_the_key(case: BadBlock) -> None:
    with pytest.raises(ManifestError, match=case.error):
        parse_manifest(json.dumps(_manifest(**case.changes)).encode())


def test_ssd_block_with_four_outputs_is_accepted() -> None:
    m = parse_manifest(
        json.dumps(_manifest(detection={"layout": "ssd"}, outputs=SSD_OUTPUTS)).encode()
    )
    assert m.detection == {"layout": "ssd"}
