"""Pure detection and segmentation metrics for the gate: mAP@0.5, per-class AP, mean IoU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

APMethod = Literal["all_point", "coco101"]
# COCO's 101 recall thresholds 0.00, 0.01, ..., 1.00 (same construction as pycocotools).
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)


@dataclass(frozen=True)
class ImageBoxes:
    """Boxes of one image as [x1, y1, x2, y2] in pixels, a class per box, and scores for
    detections (None for ground truth)."""

    boxes: npt.NDArray[Any]
    classes: npt.NDArray[Any]
    scores: npt.NDArray[Any] | None = None


def box_iou(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> FloatArray:
    """IoU of every box in ``a`` [M,4] with every box in ``b`` [K,4] (xyxy, continuous)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    out: FloatArray = iou
    return out


def average_precision(
    recall: FloatArray, precision: FloatArray, method: APMethod = "all_point"
) -> float:
    """Area under the interpolated precision-recall curve.

    ``all_point`` is the VOC 2010+ rule (every recall step, precision made monotone);
    ``coco101`` samples the monotone curve at 101 recall points as pycocotools does.
    """
    if len(recall) == 0:
        return 0.0
    if method == "coco101":
        pr = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")
        sampled = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0)
        return float(sampled.mean())
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _match_image(
    det_boxes: npt.NDArray[Any], gt_boxes: npt.NDArray[Any], iou_threshold: float
) -> npt.NDArray[np.bool_]:
    """Greedy COCO matching: each detection (score order) takes the best unmatched box."""
    hits = np.zeros(len(det_boxes), dtype=bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return hits
    ious = box_iou(det_boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for d in range(len(det_boxes)):
        best, best_iou = -1, min(iou_threshold, 1 - 1e-10)
        for g in range(len(gt_boxes)):
            # ">=" and a later box winning a tie follow pycocotools' loop exactly.
            if not taken[g] and ious[d, g] >= best_iou:
                best, best_iou = g, ious[d, g]
        if best >= 0:
            taken[best] = True
            hits[d] = True
    return hits


def detection_map(
    ground_truth: Sequence[ImageBoxes],
    detections: Sequence[ImageBoxes],
    num_classes: int,
    iou_threshold: float = 0.5,
    method: APMethod = "all_point",
) -> dict[str, Any]:
    """mAP at one IoU threshold and AP per class (classes without ground truth are left out)."""
    if len(ground_truth) != len(detections):
        raise ValueError(
            f"{len(ground_truth)} ground-truth images but {len(detections)} detection images"
        )
    per_class: dict[int, float] = {}
    for cls in range(num_classes):
        scores: list[float] = []
        hits: list[bool] = []
        num_gt = 0
        for gt, det in zip(ground_truth, detections):
            gt_boxes = np.asarray(gt.boxes).reshape(-1, 4)[np.asarray(gt.classes) == cls]
            num_gt += len(gt_boxes)
            det_scores = np.asarray(det.scores if det.scores is not None else [], dtype=float)
            mask = np.asarray(det.classes) == cls
            d_boxes = np.asarray(det.boxes).reshape(-1, 4)[mask]
            d_scores = det_scores[mask]
            order = np.argsort(-d_scores, kind="mergesort")
            d_boxes, d_scores = d_boxes[order], d_scores[order]
            hits.extend(_match_image(d_boxes, gt_boxes, iou_threshold).tolist())
            scores.extend(d_scores.tolist())
        if num_gt == 0:
            continue
        order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
        tp = np.asarray(hits, dtype=float)[order]
        tp_cum = np.cumsum(tp)
        fp_cum = np.cumsum(1.0 - tp)
        recall = tp_cum / num_gt
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        per_class[cls] = average_precision(recall, precision, method)
    mean_ap = float(np.mean(list(per_class.values()))) if per_class else 0.0
    return {"map": mean_ap, "per_class_ap": {str(c): ap for c, ap in per_class.items()}}


def mean_iou(
    labels: npt.NDArray[Any],
    predicted: npt.NDArray[Any],
    num_classes: int,
    ignore_index: int | None = 255,
) -> dict[str, Any]:
    """Segmentation mean IoU over classes that occur in labels or predictions, and per class."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    p = np.asarray(predicted).reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = y != ignore_index
        y, p = y[keep], p[keep]
    cm = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    cm = cm.reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), 0.0)
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "per_class_iou": {str(c): float(iou[c]) for c in range(num_classes) if present[c]},
    }


# COCO's ten IoU thresholds 0.50, 0.55, ..., 0.95 (same construction as pycocotools).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)
COCO_MAX_DETS = 100


def _match_thresholds(
    ious: FloatArray, thresholds: FloatArray
) -> npt.NDArray[np.bool_]:
    """_match_image at every IoU threshold at once: hits [T, detections] for one image's
    detections of one class (score order) against its ground-truth boxes."""
    num_t, (num_d, num_g) = len(thresholds), ious.shape
    hits = np.zeros((num_t, num_d), dtype=bool)
    if num_d == 0 or num_g == 0:
        return hits
    floor = np.minimum(thresholds, 1 - 1e-10)[:, None]
    taken = np.zeros((num_t, num_g), dtype=bool)
    rows = np.arange(num_t)
    for d in range(num_d):
        masked = np.where(~taken & (ious[d][None, :] >= floor), ious[d][None, :], -1.0)
        # the best IoU, the last box on a tie (pycocotools' ">=" loop)
        best = num_g - 1 - np.argmax(masked[:, ::-1], axis=1)
        ok = masked[rows, best] >= 0.0
        hits[ok, d] = True
        taken[rows[ok], best[ok]] = True
    return hits


def coco_detection_metrics(
    ground_truth: Sequence[ImageBoxes],
    detections: Sequence[ImageBoxes],
    num_classes: int,
    max_dets: int = COCO_MAX_DETS,
) -> dict[str, Any]:
    """COCO box metrics as pycocotools computes them (area "all", ``max_dets`` per image and
    class, 101 recall points): mAP@0.5, mAP@0.5:0.95 and both per class (classes without
    ground truth are left out), plus box counts."""
    if len(ground_truth) != len(detections):
        raise ValueError(
            f"{len(ground_truth)} ground-truth images but {len(detections)} detection images"
        )
    thresholds = COCO_IOU_THRESHOLDS
    per50: dict[str, float] = {}
    per5095: dict[str, float] = {}
    gt_classes = [np.asarray(g.classes).reshape(-1) for g in ground_truth]
    gt_boxes = [np.asarray(g.boxes, dtype=np.float64).reshape(-1, 4) for g in ground_truth]
    det_classes = [np.asarray(d.classes).reshape(-1) for d in detections]
    det_boxes = [np.asarray(d.boxes, dtype=np.float64).reshape(-1, 4) for d in detections]
    det_scores = [
        np.asarray(d.scores if d.scores is not None else [], dtype=np.float64).reshape(-1)
        for d in detections
    ]
    for cls in range(num_classes):
        num_gt = 0
        hit_parts: list[npt.NDArray[np.bool_]] = []
        score_parts: list[FloatArray] = []
        for i in range(len(ground_truth)):
            g = gt_boxes[i][gt_classes[i] == cls]
            num_gt += len(g)
            mask = det_classes[i] == cls
            if not mask.any():
                continue
            s = det_scores[i][mask]
            order = np.argsort(-s, kind="mergesort")[:max_dets]
            b = det_boxes[i][mask][order]
            hit_parts.append(_match_thresholds(box_iou(b, g), thresholds))
            score_parts.append(s[order])
        if num_gt == 0:
            continue
        if not score_parts:
            per50[str(cls)], per5095[str(cls)] = 0.0, 0.0
            continue
        scores = np.concatenate(score_parts)
        order = np.argsort(-scores, kind="mergesort")
        tp = np.concatenate(hit_parts, axis=1)[:, order].astype(np.float64)
        tp_cum = np.cumsum(tp, axis=1)
        fp_cum = np.cumsum(1.0 - tp, axis=1)
        recall = tp_cum / num_gt
        precision = tp_cum / (tp_cum + fp_cum + np.spacing(1))
        aps = [
            average_precision(recall[t], precision[t], "coco101") for t in range(len(thresholds))
        ]
        per50[str(cls)] = aps[0]
        per5095[str(cls)] = float(np.mean(aps))
    return {
        "map50": float(np.mean(list(per50.values()))) if per50 else 0.0,
        "map50_95": float(np.mean(list(per5095.values()))) if per5095 else 0.0,
        "per_class_ap50": per50,
        "per_class_ap50_95": per5095,
        "gt_boxes": int(sum(len(c) for c in gt_classes)),
        "det_boxes": int(sum(len(c) for c in det_classes)),
    }
