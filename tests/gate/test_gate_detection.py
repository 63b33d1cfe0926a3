"""Detection mAP@0.5 checked against pycocotools on a small hand-made case; segmentation mIoU."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from agent.ota.gate_checks import detection_checks
from agent.ota.gate_detection import ImageBoxes, average_precision, detection_map, mean_iou
from agent.ota.gate_policy import GatePolicy

# Three images, two classes (xyxy pixels). Includes a duplicate detection, a false positive,
# a box below IoU 0.5, a missed object and a class-1 image with no detections.
GT = [
    ImageBoxes(np.array([[10, 10, 50, 50], [60, 60, 100, 100]]), np.array([0, 1])),
    ImageBoxes(np.array([[0, 0, 30, 30], [40, 0, 80, 40], [5, 50, 45, 90]]), np.array([0, 0, 1])),
    ImageBoxes(np.array([[20, 20, 60, 70]]), np.array([1])),
]
DETS = [
    ImageBoxes(
        np.array([[12, 12, 50, 52], [11, 9, 49, 50], [62, 58, 100, 98], [0, 60, 20, 80]]),
        np.array([0, 0, 1, 1]),
        np.array([0.9, 0.6, 0.8, 0.3]),
    ),
    ImageBoxes(
        np.array([[1, 1, 31, 29], [55, 10, 95, 50], [6, 52, 44, 88]]),
        np.array([0, 0, 1]),
        np.array([0.75, 0.65, 0.4]),
    ),
    ImageBoxes(np.zeros((0, 4)), np.zeros(0, dtype=int), np.zeros(0)),
]


def _coco_ap50(gt: list[ImageBoxes], dets: list[ImageBoxes]) -> tuple[float, dict[int, float]]:
    images, anns, results = [], [], []
    for img_id, (g, d) in enumerate(zip(gt, dets), start=1):
        images.append({"id": img_id, "width": 200, "height": 200})
        for box, cls in zip(g.boxes, g.classes):
            x1, y1, x2, y2 = (float(v) for v in box)
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
        for box, cls, score in zip(d.boxes, d.classes, d.scores):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": img_id,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        }
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    per_class = {}
    for k in range(2):
        p = ev.eval["precision"][iou50, :, k, 0, -1]  # area "all", maxDets 100
        per_class[k] = float(np.mean(p[p > -1]))
    return float(ev.stats[1]), per_class


def test_map50_matches_pycocotools():
    expected_map, expected_per_class = _coco_ap50(GT, DETS)
    got = detection_map(GT, DETS, num_classes=2, method="coco101")
    assert got["map"] == pytest.approx(expected_map, abs=1e-9)
    for k, ap in expected_per_class.items():
        assert got["per_class_ap"][str(k)] == pytest.approx(ap, abs=1e-9)
    assert 0.0 < got["map"] < 1.0  # the case exercises misses and false positives


def test_all_point_ap_known_answer():
    # Three objects; detections by score: hit, miss, hit, hit.
    recall = np.array([1 / 3, 1 / 3, 2 / 3, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3, 0.75])
    # Monotone envelope: [1, .75, .75, .75]; area = 1/3*1 + 1/3*.75 + 1/3*.75 = 0.8333...
    assert average_precision(recall, precision, "all_point") == pytest.approx(5 / 6)


def test_perfect_detections_give_map_one_and_no_detections_zero():
    perfect = [ImageBoxes(g.boxes, g.classes, np.ones(len(g.classes))) for g in GT]
    assert detection_map(GT, perfect, 2)["map"] == pytest.approx(1.0)
    empty = [ImageBoxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0)) for _ in GT]
    assert detection_map(GT, empty, 2)["map"] == 0.0


def test_detection_check_names_the_class_that_fell():
    base = detection_map(GT, DETS, 2)
    worse = [
        DETS[0],
        ImageBoxes(DETS[1].boxes[:1], DETS[1].classes[:1], DETS[1].scores[:1]),
        DETS[2],
    ]
    cand = detection_map(GT, worse, 2)
    (check,) = detection_checks(GatePolicy(), base, cand)
    assert check.verdict == "fail"
    assert "worst class 1" in check.detail
    (same,) = detection_checks(GatePolicy(), base, base)
    assert same.verdict == "pass"


def test_mean_iou_known_answer():
    labels = np.array([[[0, 0, 1, 1], [0, 0, 1, 255]]])
    pred = np.array([[[0, 1, 1, 1], [0, 0, 1, 0]]])
    out = mean_iou(labels, pred, num_classes=2)
    # class 0: tp 3, union 4 -> .75; class 1: tp 3, union 4 -> .75 (the 255 pixel ignored)
    assert out["per_class_iou"] == {"0": pytest.approx(0.75), "1": pytest.approx(0.75)}
    assert out["miou"] == pytest.approx(0.75)
