"""Turns model outputs into results: top-k with labels, or boxes with score threshold and NMS."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
# up to this many classes, top-1 runs in plain Python (cheaper than numpy per frame)
SMALL_ROW = 64


def softmax(logits: npt.NDArray[Any]) -> FloatArray:
    """Row-wise softmax, stable for large logits."""
    x = np.asarray(logits, dtype=np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    out: FloatArray = e / e.sum(axis=-1, keepdims=True)
    return out


def looks_like_probabilities(row: npt.NDArray[Any]) -> bool:
    """True when a row already sums to 1 with values in [0, 1] (a softmax head)."""
    return bool(row.min() >= 0.0 and row.max() <= 1.0 and abs(float(row.sum()) - 1.0) < 1e-3)


def top_k(scores: npt.NDArray[Any], k: int = 1, labels: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The k best classes of one output row, with probabilities and labels."""
    row = np.asarray(scores, dtype=np.float32).reshape(-1)
    if k <= 1 and 0 < row.size <= SMALL_ROW:
        return [_top_one(row.tolist(), labels)]
    probs = row if looks_like_probabilities(row) else softmax(row)
    k = max(1, min(k, row.size))
    best = np.argsort(-probs, kind="stable")[:k]
    out = []
    for idx in best:
        i = int(idx)
        item: dict[str, Any] = {"class": i, "score": round(float(probs[i]), 6)}
        if i < len(labels):
            item["label"] = labels[i]
        out.append(item)
    return out


def top_k_rows(output: npt.NDArray[Any], k: int = 1, labels: Sequence[str] = ()) -> list[Any]:
    """top_k of every row of a batch output: one list of results per row.

    For top-1 over a small row (the usual classifier) the whole batch crosses into Python
    floats in one call. The frame loop runs this on every frame, right after a cap sleep
    left the caches cold, where each numpy call on a row costs ~10 us.
    """
    arr = np.asarray(output)
    if k <= 1 and arr.ndim == 2 and 0 < arr.shape[1] <= SMALL_ROW:
        return [[_top_one(vals, labels)] for vals in arr.astype(np.float32, copy=False).tolist()]
    return [top_k(arr[i], k, labels) for i in range(arr.shape[0])]


def _top_one(vals: list[float], labels: Sequence[str]) -> dict[str, Any]:
    """top_k(row, 1) for a small row in plain Python floats (float64: the score may differ
    from the float32 softmax in the 6th decimal; the class is the first best, as there).

    It runs on every frame, and after each FPS-cap sleep the first numpy reduction runs
    on cold caches (~100 us on a busy 2-core box, against ~50 us for this whole path).
    """
    hi = max(vals)
    i = vals.index(hi)
    if min(vals) >= 0.0 and hi <= 1.0 and abs(sum(vals) - 1.0) < 1e-3:
        score = hi
    else:
        # softmax of the best class: exp(hi - hi) / sum(exp(v - hi))
        score = 1.0 / sum([math.exp(v - hi) for v in vals])
    item: dict[str, Any] = {"class": i, "score": round(score, 6)}
    if i < len(labels):
        item["label"] = labels[i]
    return item


def iou(box: FloatArray, boxes: FloatArray) -> FloatArray:
    """Intersection over union of one (x1, y1, x2, y2) box with many."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    out: FloatArray = inter / np.maximum(area + areas - inter, 1e-9)
    return out


def nms(boxes: FloatArray, scores: FloatArray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        i = int(order.pop(0))
        keep.append(i)
        if not order:
            break
        rest = np.array(order)
        overlaps = iou(boxes[i], boxes[rest])
        order = [int(j) for j, o in zip(rest, overlaps) if o <= iou_threshold]
    return keep


def detections(
    outputs: Sequence[npt.NDArray[Any]],
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    labels: Sequence[str] = (),
    row: int = 0,
) -> list[dict[str, Any]]:
    """Boxes of one image from a detector's outputs, filtered by score and per-class NMS.

    Accepts either one tensor [N, K, 6] of (x1, y1, x2, y2, score, class) or three tensors
    boxes [N, K, 4], scores [N, K], classes [N, K].
    """
    if len(outputs) >= 3:
        boxes = np.asarray(outputs[0][row], dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(outputs[1][row], dtype=np.float32).reshape(-1)
        classes = np.asarray(outputs[2][row]).reshape(-1).astype(np.int64)
    else:
        flat = np.asarray(outputs[0][row], dtype=np.float32).reshape(-1, 6)
        boxes, scores, classes = flat[:, :4], flat[:, 4], flat[:, 5].astype(np.int64)
    mask = scores >= score_threshold
    boxes, scores, classes = boxes[mask], scores[mask], classes[mask]
    found: list[dict[str, Any]] = []
    for cls in np.unique(classes):
        idx = np.flatnonzero(classes == cls)
        for k in nms(boxes[idx], scores[idx], iou_threshold):
            j = idx[k]
            item: dict[str, Any] = {
                "class": int(cls),
                "score": round(float(scores[j]), 6),
                "box": [round(float(v), 3) for v in boxes[j]],
            }
            if int(cls) < len(labels):
                item["label"] = labels[int(cls)]
            found.append(item)
    found.sort(key=lambda d: -float(d["score"]))
    return found
