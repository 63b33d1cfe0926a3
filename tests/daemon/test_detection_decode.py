"""Detector output decoders on hand-made tensors: one row per layout, NMS, caps and errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from agent.config import PreprocessConfig
from agent.errors import ModelError
from agent.pipeline.detection import (
    DetectionSpec,
    decode,
    decode_batch,
    detection_spec_from_mapping,
    infer_layout,
    nms_indices,
    row_result,
    segmentation_summary,
)

# The same three objects in every layout, for a 100x200 (h x w) input:
#   A class 1 at x 10..50, y 20..60, score 0.9
#   B class 1 at x 12..52, y 22..62, score 0.6 (IoU with A ~0.82: suppressed by NMS)
#   C class 0 at x 100..140, y 20..60, score 0.8 (overlaps nothing of its class)
# plus a low-score box D (0.1, class 2) that the threshold drops.
EXPECTED = [
    (1, 0.9, [10, 20, 50, 60]),
    (0, 0.8, [100, 20, 140, 60]),
]
H, W = 100, 200


def _yolo() -> list[np.ndarray]:
    # cx, cy, w, h (pixels), objectness, 3 class scores; score = objectness x class
    rows = [
        [30, 40, 40, 40, 1.0, 0.0, 0.9, 0.1],
        [32, 42, 40, 40, 0.75, 0.1, 0.8, 0.1],
        [120, 40, 40, 40, 0.8, 1.0, 0.0, 0.0],
        [60, 60, 10, 10, 0.2, 0.0, 0.0, 0.5],
    ]
    return [np.array([rows], dtype=np.float32)]


def _yolo_normalized() -> list[np.ndarray]:
    out = _yolo()[0].copy()
    out[0, :, [0, 2]] /= W
    out[0, :, [1, 3]] /= H
    return [out]


def _yolo_transposed() -> list[np.ndarray]:
    # [N, 4 + classes, boxes], no objectness
    rows = [
        [30, 40, 40, 40, 0.0, 0.9, 0.1],
        [32, 42, 40, 40, 0.1, 0.6, 0.1],
        [120, 40, 40, 40, 0.8, 0.0, 0.0],
        [60, 60, 10, 10, 0.0, 0.0, 0.1],
    ]
    return [np.array([rows], dtype=np.float32).transpose(0, 2, 1)]


def _ssd() -> list[np.ndarray]:
    # TFLite post-process: boxes y1, x1, y2, x2 in 0..1; a padded 5th entry beyond count
    boxes = [
        [20 / H, 10 / W, 60 / H, 50 / W],
        [22 / H, 12 / W, 62 / H, 52 / W],
        [20 / H, 100 / W, 60 / H, 140 / W],
        [55 / H, 55 / W, 65 / H, 65 / W],
        [0.0, 0.0, 1.0, 1.0],
    ]
    classes = [1.0, 1.0, 0.0, 2.0, 0.0]
    scores = [0.9, 0.6, 0.8, 0.1, 0.99]
    return [
        np.array([boxes], np.float32),
        np.array([classes], np.float32),
        np.array([scores], np.float32),
        np.array([4.0], np.float32),
    ]


@dataclass(frozen=True)
class LayoutRow:
    name: str
    outputs: list[np.ndarray]
    spec: dict[str, Any]
    expected: list[tuple[int, float, list[float]]] = field(default_factory=lambda: EXPECTED)


LAYOUTS = [
    LayoutRow("yolo", _yolo(), {"layout": "yolo"}),
    LayoutRow("yolo-normalized", _yolo_normalized(), {"layout": "yolo", "box_units": "normalized"}),
    LayoutRow("yolo_transposed", _yolo_transposed(), {"layout": "yolo_transposed"}),
    # the 0.99 box after `count` is padding: it must not appear
    LayoutRow("ssd", _ssd(), {"layout": "ssd"}),
]


@pytest.mark.parametrize("case", LAYOUTS, ids=[c.name for c in LAYOUTS])
def test_each_layout_decodes_to_the_same_boxes(case: LayoutRow) -> None:
    spec = detection_spec_from_mapping({**case.spec, "score_threshold": 0.25}, "test")
    found = decode(case.outputs, spec, row=0, image_size=(H, W))
    got = [(int(c), float(s), b) for c, s, b in zip(found.classes, found.scores, found.boxes)]
    assert [g[0] for g in got] == [e[0] for e in case.expected]
    for (_, score, box), (_, want_score, want_box) in zip(got, case.expected):
        assert score == pytest.approx(want_score, abs=1e-6)
        np.testing.assert_allclose(box, want_box, atol=1e-3)


def test_nms_keeps_the_best_box_and_distinct_ones() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.5, 0.9, 0.7, 0.4], np.float32)
    # box 1 (best) suppresses 0 and 3 (IoU 0.68 and 0.68 > 0.45); 2 is far away
    assert nms_indices(boxes, scores, 0.45).tolist() == [1, 2]
    # at a looser IoU threshold only the exact duplicate (box 3 = box 0, IoU 1) goes
    assert nms_indices(boxes, scores, 0.99).tolist() == [1, 2, 0]


def test_nms_is_per_class_and_max_detections_caps() -> None:
    # two identical boxes of different classes both stay; the cap keeps the best one
    out = [np.array([[[5, 5, 10, 10, 1.0, 0.9, 0.0], [5, 5, 10, 10, 1.0, 0.0, 0.8]]], np.float32)]
    both = decode(out, DetectionSpec(layout="yolo"))
    assert both.classes.tolist() == [0, 1]
    capped = decode(out, DetectionSpec(layout="yolo", max_detections=1))
    assert capped.classes.tolist() == [0]


def test_batch_decoding_matches_row_by_row() -> None:
    rng = np.random.default_rng(3)
    out = rng.uniform(0, 1, (5, 30, 8)).astype(np.float32)
    out[..., :2] *= 64
    out[..., 2:4] *= 20
    spec = DetectionSpec(layout="yolo", score_threshold=0.2)
    batch = decode_batch([out], spec)
    for row in range(5):
        one = decode([out], spec, row=row)
        np.testing.assert_array_equal(batch[row].classes, one.classes)
        np.testing.assert_allclose(batch[row].boxes, one.boxes)
    assert sum(len(d) for d in batch) > 5  # the case keeps boxes at all


@dataclass(frozen=True)
class BadRow:
    name: str
    outputs: list[np.ndarray]
    layout: str
    error: str


BAD = [
    BadRow("yolo-rank-2", [np.zeros((1, 8), np.float32)], "yolo", "rank 3"),
    BadRow("yolo-too-narrow", [np.zeros((1, 4, 5), np.float32)], "yolo", "4 + 1 + classes"),
    BadRow(
        "transposed-too-narrow", [np.zeros((1, 4, 9), np.float32)], "yolo_transposed", "4 + classes"
    ),
    BadRow(
        "ssd-two-outputs", [np.zeros((1, 3, 4)), np.zeros((1, 3))], "ssd", "boxes, classes, scores"
    ),
    BadRow(
        "ssd-lengths-differ",
        [np.zeros((1, 3, 4)), np.zeros((1, 2)), np.zeros((1, 3))],
        "ssd",
        "3 boxes, 2 classes",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_outputs_that_do_not_fit_the_layout_are_refused(case: BadRow) -> None:
    with pytest.raises(ModelError, match=re.escape(case.error)):
        decode(case.outputs, DetectionSpec(layout=case.layout))


@pytest.mark.parametrize(
    "block,error",
    [
        ({"layout": "retina"}, "layout"),
        ({"layout": "yolo", "score_threshold": 1.5}, "score_threshold"),
        ({"layout": "yolo", "max_detections": 0}, "max_detections"),
        ({"layout": "yolo", "nms": 0.5}, "unknown key"),
        ({"layout": "yolo", "box_units": "inches"}, "box_units"),
    ],
    ids=["layout", "score", "max-dets", "unknown-key", "units"],
)
def test_bad_detection_blocks_are_named(block: dict[str, Any], error: str) -> None:
    with pytest.raises(ModelError, match=error):
        detection_spec_from_mapping(block, "manifest.json")


def test_layout_is_guessed_from_output_shapes() -> None:
    assert infer_layout([(1, 64, 8)]) == "yolo"
    assert infer_layout([(1, 84, 8400)]) == "yolo_transposed"
    assert infer_layout([(1, 10, 4), (1, 10), (1, 10), (1,)]) == "ssd"


def test_row_result_for_a_detector_and_a_segmenter() -> None:
    pre = PreprocessConfig(task="detection", detection_layout="yolo")
    res = row_result(_yolo(), pre, ("a", "b", "c"), 0)
    assert res.key == "detections" and res.top_class == 1
    assert res.value[0]["label"] == "b" and res.box_scores == pytest.approx((0.9, 0.8))
    seg = np.zeros((1, 3, 2, 2), np.float32)
    seg[0, 2] = 1.0  # class 2 wins three pixels, class 0 one
    seg[0, 0, 0, 0] = 5.0
    res = row_result([seg], PreprocessConfig(task="segmentation"), ("bg", "x", "road"), 0)
    assert res.key == "segmentation" and res.top_class == 2 and res.confidence == 0.75
    assert res.value == segmentation_summary(seg, ("bg", "x", "road"))
    assert res.value["classes"] == [
        {"class": 2, "share": 0.75, "label": "road"},
        {"class": 0, "share": 0.25, "label": "bg"},
    ]


def test_synthetic_shapes_source_draws_the_detector_frames() -> None:
    from agent.config import SourceConfig
    from agent.pipeline.sources import open_source

    source = open_source(SourceConfig(pattern="shapes", max_frames=3), (None, 1, 64, 64))
    assert source.name == "synthetic:shapes"
    frames = [source.read(0.1) for _ in range(3)]
    assert all(f is not None and f.data.shape == (64, 64) for f in frames)
    bright = [int((f.data > 120).sum()) for f in frames if f is not None]
    assert min(bright) >= 12 * 12 // 2  # at least one shape's worth of bright pixels
    assert source.read(0.1) is None and source.exhausted
