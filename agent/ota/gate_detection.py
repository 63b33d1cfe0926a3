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


def flatten_boxes(
    images: Sequence[ImageBoxes], num_classes: int, scored: bool = False
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], FloatArray, FloatArray]:
    """Every box of every image as flat arrays: image index, class, xyxy box, score (1 for
    ground truth); boxes of classes outside 0..num_classes-1 are left out."""
    img, cls, box, score = [], [], [], []
    for i, entry in enumerate(images):
        c = np.asarray(entry.classes).reshape(-1).astype(np.int64)
        img.append(np.full(len(c), i, dtype=np.int64))
        cls.append(c)
        box.append(np.asarray(entry.boxes, dtype=np.float64).reshape(-1, 4))
        raw = entry.scores if scored and entry.scores is not None else np.ones(len(c))
        score.append(np.asarray(raw, dtype=np.float64).reshape(-1))
    if not img:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 4)), np.zeros(0)
    i_all, c_all = np.concatenate(img), np.concatenate(cls)
    b_all, s_all = np.concatenate(box), np.concatenate(score)
    keep = (c_all >= 0) & (c_all < num_classes)
    return i_all[keep], c_all[keep], b_all[keep], s_all[keep]


def _ranks(groups: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Position of each entry within its group, for entries already sorted by group."""
    if len(groups) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    counts = np.diff(np.r_[starts, len(groups)])
    out: npt.NDArray[np.int64] = np.arange(len(groups)) - np.repeat(starts, counts)
    return out


def _slots(
    sorted_keys: npt.NDArray[np.int64], keys: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Which ``keys`` occur in ``sorted_keys`` (unique, ascending), and the index of each
    one that does (np.isin's answer without its hashing, plus the positions)."""
    at = np.searchsorted(sorted_keys, keys)
    found = sorted_keys[np.minimum(at, len(sorted_keys) - 1)] == keys
    slots: npt.NDArray[np.int64] = at[found].astype(np.int64)
    return found, slots


def _batched_iou(a: FloatArray, b: FloatArray) -> FloatArray:
    """IoU of each group's boxes: a [P, D, 4] x b [P, G, 4] -> [P, D, G]."""
    ix1 = np.maximum(a[:, :, None, 0], b[:, None, :, 0])
    iy1 = np.maximum(a[:, :, None, 1], b[:, None, :, 1])
    ix2 = np.minimum(a[:, :, None, 2], b[:, None, :, 2])
    iy2 = np.minimum(a[:, :, None, 3], b[:, None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a[:, :, None] + area_b[:, None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out: FloatArray = np.where(union > 0, inter / union, 0.0)
    return out


def coco_detection_metrics(
    ground_truth: Sequence[ImageBoxes],
    detections: Sequence[ImageBoxes],
    num_classes: int,
    max_dets: int = COCO_MAX_DETS,
) -> dict[str, Any]:
    """COCO box metrics as pycocotools computes them (area "all", ``max_dets`` per image and
    class, 101 recall points): mAP@0.5, mAP@0.5:0.95 and both per class (classes without
    ground truth are left out), plus box counts.

    All images and classes at once: each (image, class) pair's detections (score order)
    and ground truth are padded into arrays, and the greedy matching (each detection takes
    the best unmatched box with IoU >= t, the later box on a tie, as pycocotools' loop)
    runs for the ten IoU thresholds together, one detection rank at a time."""
    if len(ground_truth) != len(detections):
        raise ValueError(
            f"{len(ground_truth)} ground-truth images but {len(detections)} detection images"
        )
    return coco_metrics_flat(
        flatten_boxes(ground_truth, num_classes, scored=False),
        flatten_boxes(detections, num_classes, scored=True),
        num_classes,
        max_dets,
    )


FlatBoxes = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], FloatArray, FloatArray]


def coco_metrics_flat(
    ground_truth: FlatBoxes, detections: FlatBoxes, num_classes: int, max_dets: int
) -> dict[str, Any]:
    """coco_detection_metrics() over flat arrays (image index, class, xyxy box, score), as
    flatten_boxes() makes them: the gate decodes a whole golden set straight into this form."""
    thresholds = COCO_IOU_THRESHOLDS
    num_t = len(thresholds)
    g_img, g_cls, g_box, _ = ground_truth
    d_img, d_cls, d_box, d_score = detections
    keep = (d_cls >= 0) & (d_cls < num_classes)
    d_img, d_cls, d_box, d_score = d_img[keep], d_cls[keep], d_box[keep], d_score[keep]
    g_pair = g_img * num_classes + g_cls
    d_pair = d_img * num_classes + d_cls
    # detections by (image, class), best score first, ties in the given order; at most
    # max_dets per pair (pycocotools' maxDets)
    d_order = np.lexsort((-d_score, d_pair))
    d_pair, d_box, d_score, d_cls = (
        d_pair[d_order],
        d_box[d_order],
        d_score[d_order],
        d_cls[d_order],
    )
    d_rank = _ranks(d_pair)
    kept = d_rank < max_dets
    d_pair, d_box, d_score, d_cls, d_rank = (
        d_pair[kept], d_box[kept], d_score[kept], d_cls[kept], d_rank[kept]
    )  # fmt: skip
    g_order = np.argsort(g_pair, kind="stable")
    g_pair, g_box = g_pair[g_order], g_box[g_order]
    g_rank = _ranks(g_pair)
    hits = np.zeros((num_t, len(d_pair)), dtype=bool)
    both = np.intersect1d(d_pair, g_pair)
    if len(both):
        # each pair's slot: its index in the sorted ``both`` (no per-box Python)
        d_in, d_slot = _slots(both, d_pair)
        g_in, g_slot = _slots(both, g_pair)
        width_d, width_g = int(d_rank[d_in].max()) + 1, int(g_rank[g_in].max()) + 1
        db = np.zeros((len(both), width_d, 4))
        dv = np.zeros((len(both), width_d), dtype=bool)
        gb = np.zeros((len(both), width_g, 4))
        gv = np.zeros((len(both), width_g), dtype=bool)
        db[d_slot, d_rank[d_in]] = d_box[d_in]
        dv[d_slot, d_rank[d_in]] = True
        gb[g_slot, g_rank[g_in]] = g_box[g_in]
        gv[g_slot, g_rank[g_in]] = True
        ious = _batched_iou(db, gb)
        floor = np.minimum(thresholds, 1 - 1e-10)[None, :, None]
        taken = np.zeros((len(both), num_t, width_g), dtype=bool)
        matched = np.zeros((len(both), num_t, width_d), dtype=bool)
        for d in range(width_d):
            iou_d = ious[:, d, None, :]
            masked = np.where(~taken & gv[:, None, :] & (iou_d >= floor), iou_d, -1.0)
            best = width_g - 1 - np.argmax(masked[:, :, ::-1], axis=2)
            ok = (np.take_along_axis(masked, best[:, :, None], axis=2)[:, :, 0] >= 0.0) & dv[
                :, d, None
            ]
            matched[:, :, d] = ok
            pi, ti = np.nonzero(ok)
            taken[pi, ti, best[pi, ti]] = True
        hits[:, d_in] = matched[d_slot, :, d_rank[d_in]].T
    num_gt = np.bincount(g_cls, minlength=num_classes)
    per50: dict[str, float] = {}
    per5095: dict[str, float] = {}
    aps = _coco_class_aps(hits, d_cls, d_score, num_gt, num_classes)
    for cls in range(num_classes):
        if num_gt[cls] == 0:
            continue
        per50[str(cls)] = float(aps[cls, 0])
        per5095[str(cls)] = float(np.mean(aps[cls].tolist()))
    return {
        "map50": float(np.mean(list(per50.values()))) if per50 else 0.0,
        "map50_95": float(np.mean(list(per5095.values()))) if per5095 else 0.0,
        "per_class_ap50": per50,
        "per_class_ap50_95": per5095,
        "gt_boxes": len(g_cls),
        "det_boxes": len(d_cls),
    }


def _coco_class_aps(
    hits: npt.NDArray[np.bool_],
    d_cls: npt.NDArray[np.int64],
    d_score: FloatArray,
    num_gt: npt.NDArray[np.int64],
    num_classes: int,
) -> FloatArray:
    """AP [classes, thresholds] from the matched detections (``hits`` [T, D]), pycocotools'
    accumulate() for every class and IoU threshold at once: each class's detections by
    score (ties in image order), cumulative true and false positives, precision made
    monotone from the right, sampled at the 101 recall points (0 past the last recall).
    Classes are padded into one [C, T, width] block, so no step loops over classes."""
    num_t = hits.shape[0]
    aps = np.zeros((num_classes, num_t))
    if len(d_cls) == 0:
        return aps
    # by class, then best score first; ties keep image order (lexsort is stable), as
    # pycocotools' mergesort over the image-ordered list
    order = np.lexsort((-d_score, d_cls))
    cls_sorted = d_cls[order]
    rank = _ranks(cls_sorted)
    width = int(rank.max()) + 1
    tp = np.zeros((num_classes, num_t, width))
    valid = np.zeros((num_classes, width), dtype=bool)
    tp[cls_sorted, :, rank] = hits[:, order].T.astype(np.float64)
    valid[cls_sorted, rank] = True
    # cumulative sums of 0/1 values are exact, whatever the grouping
    tp_cum = np.cumsum(tp, axis=2)
    fp_cum = np.cumsum(valid[:, None, :] & (tp == 0.0), axis=2, dtype=np.float64)
    gt = np.maximum(num_gt, 1).astype(np.float64)[:, None, None]
    recall = np.where(valid[:, None, :], tp_cum / gt, np.inf)
    precision = np.where(valid[:, None, :], tp_cum / (tp_cum + fp_cum + np.spacing(1)), 0.0)
    # one zero column past the end: where no recall reaches a point, it samples 0
    precision = np.concatenate([precision, np.zeros((num_classes, num_t, 1))], axis=2)
    monotone = np.maximum.accumulate(precision[:, :, ::-1], axis=2)[:, :, ::-1]
    # the first position whose recall reaches each point (searchsorted "left" per row;
    # recall only grows along a row, and padding is +inf)
    idx = (recall[:, :, None, :] < COCO_RECALL_THRESHOLDS[None, None, :, None]).sum(axis=3)
    sampled = np.take_along_axis(monotone, idx, axis=2)
    aps[:] = sampled.mean(axis=2)
    return aps
