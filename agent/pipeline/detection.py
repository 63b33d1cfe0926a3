"""Detector output decoders (YOLO, transposed YOLO, SSD): score threshold, per-class NMS, a cap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError

# `yolo`: one tensor [N, boxes, 4 + 1 + classes] of (cx, cy, w, h, objectness, class scores);
# `yolo_transposed`: one tensor [N, 4 + classes, boxes] (newer exports: no objectness);
# `ssd`: four tensors boxes [N, K, 4] (y1, x1, y2, x2 in 0..1), classes [N, K], scores [N, K],
# count [N] (TFLite's detection post-process).
DETECTION_LAYOUTS = ("yolo", "yolo_transposed", "ssd")
# YOLO boxes come in input pixels or as 0..1 shares of the input (SSD's are always 0..1):
# a fully int8 model keeps its scores precise only when boxes share their 0..1 range.
BOX_UNITS = ("pixels", "normalized")
MAX_DETECTIONS_LIMIT = 10_000


@dataclass(frozen=True)
class DetectionSpec:
    """How to read a detector's outputs: the layout and the post-processing thresholds."""

    layout: str = "yolo"
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100
    box_units: str = "pixels"

    @property
    def normalized(self) -> bool:
        return self.layout == "ssd" or self.box_units == "normalized"

    def check(self) -> str | None:
        if self.layout not in DETECTION_LAYOUTS:
            return f"layout: expected one of {', '.join(DETECTION_LAYOUTS)}, got {self.layout!r}"
        if self.box_units not in BOX_UNITS:
            return f"box_units: expected one of {', '.join(BOX_UNITS)}, got {self.box_units!r}"
        if not 0.0 <= self.score_threshold <= 1.0:
            return f"score_threshold: must be within 0..1, got {self.score_threshold}"
        if not 0.0 < self.iou_threshold <= 1.0:
            return f"iou_threshold: must be above 0 and at most 1, got {self.iou_threshold}"
        if not 1 <= self.max_detections <= MAX_DETECTIONS_LIMIT:
            return f"max_detections: must be within 1..{MAX_DETECTIONS_LIMIT}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "box_units": self.box_units,
        }


def detection_spec_from_mapping(data: Mapping[str, Any] | None, where: str) -> DetectionSpec:
    """A manifest's (or golden set's) ``detection`` block as a DetectionSpec; a bad key or
    value is a ModelError naming ``where``."""
    if not data:
        return DetectionSpec()
    known = {"layout", "score_threshold", "iou_threshold", "max_detections", "box_units"}
    for key in data:
        if key not in known:
            raise ModelError(f"{where}: detection.{key}: unknown key (known: {sorted(known)})")
    try:
        spec = DetectionSpec(
            layout=str(data.get("layout", "yolo")),
            score_threshold=float(data.get("score_threshold", 0.25)),
            iou_threshold=float(data.get("iou_threshold", 0.45)),
            max_detections=int(data.get("max_detections", 100)),
            box_units=str(data.get("box_units", "pixels")),
        )
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: detection: {exc}") from None
    problem = spec.check()
    if problem:
        raise ModelError(f"{where}: detection.{problem}")
    return spec


@dataclass(frozen=True)
class Detections:
    """The boxes found in one image: xyxy pixels [K, 4], class ids [K], scores [K], best first."""

    boxes: npt.NDArray[np.float32]
    classes: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.scores)

    def to_list(self, labels: Sequence[str] = ()) -> list[dict[str, Any]]:
        """JSON-ready boxes for sinks: class, label, score and [x1, y1, x2, y2]."""
        out: list[dict[str, Any]] = []
        for box, cls, score in zip(
            self.boxes.tolist(), self.classes.tolist(), self.scores.tolist()
        ):
            item: dict[str, Any] = {
                "class": int(cls),
                "score": round(float(score), 6),
                "box": [round(float(v), 3) for v in box],
            }
            if 0 <= cls < len(labels):
                item["label"] = labels[cls]
            out.append(item)
        return out


def _cxcywh_to_xyxy(b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    half = b[..., 2:4] / 2.0
    out: npt.NDArray[np.float32] = np.concatenate([b[..., 0:2] - half, b[..., 0:2] + half], axis=-1)
    return out


Candidates = tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.bool_]
]


def candidates(outputs: Sequence[npt.NDArray[Any]], layout: str) -> Candidates:
    """Every box of every image before thresholding: xyxy boxes [R, B, 4] in the model's
    units, classes [R, B], scores [R, B] and which entries are real [R, B] (SSD's ``count``
    cuts the rest)."""
    boxes, centred, classes, scores, valid = _raw_candidates(outputs, layout)
    return (_cxcywh_to_xyxy(boxes) if centred else boxes), classes, scores, valid


def _raw_candidates(
    outputs: Sequence[npt.NDArray[Any]], layout: str
) -> tuple[
    npt.NDArray[np.float32],
    bool,
    npt.NDArray[np.int64],
    npt.NDArray[np.float32],
    npt.NDArray[np.bool_],
]:
    """candidates() with the boxes as the model wrote them and whether they are centred
    (cx, cy, w, h: YOLO) rather than xyxy: the decoder converts only the boxes it keeps."""
    if layout in ("yolo", "yolo_transposed"):
        if not outputs:
            raise ModelError(f"{layout} layout: the model has no output")
        out = np.asarray(outputs[0], dtype=np.float32)
        if out.ndim != 3:
            raise ModelError(
                f"{layout} layout needs one output of rank 3, got shape {list(out.shape)}"
            )
        if layout == "yolo_transposed":
            if out.shape[1] < 5:
                raise ModelError(
                    f"yolo_transposed layout needs [N, 4 + classes, boxes], got {list(out.shape)}"
                )
            rows = np.swapaxes(out, 1, 2)
            cls_scores = rows[:, :, 4:]
        else:
            if out.shape[2] < 6:
                raise ModelError(
                    f"yolo layout needs [N, boxes, 4 + 1 + classes], got {list(out.shape)}"
                )
            rows = out
            cls_scores = rows[:, :, 5:] * rows[:, :, 4:5]
        classes = cls_scores.argmax(axis=2)
        scores = cls_scores.max(axis=2)  # the argmax class's score
        valid = np.ones(scores.shape, dtype=bool)
        return rows[:, :, :4], True, classes.astype(np.int64), scores, valid
    if layout == "ssd":
        if len(outputs) < 3:
            raise ModelError(
                f"ssd layout needs outputs boxes, classes, scores[, count], got {len(outputs)}"
            )
        boxes = np.asarray(outputs[0], dtype=np.float32)
        n = boxes.shape[0] if boxes.ndim else 0
        boxes = boxes.reshape(n, -1, 4)
        cls_raw = np.asarray(outputs[1]).reshape(n, -1)
        scores = np.asarray(outputs[2], dtype=np.float32).reshape(n, -1)
        if not boxes.shape[1] == cls_raw.shape[1] == scores.shape[1]:
            raise ModelError(
                f"ssd layout: {boxes.shape[1]} boxes, {cls_raw.shape[1]} classes and "
                f"{scores.shape[1]} scores per image"
            )
        valid = np.ones(scores.shape, dtype=bool)
        if len(outputs) >= 4:
            count = np.asarray(outputs[3]).reshape(n, -1)[:, 0].astype(np.int64)
            valid = np.arange(scores.shape[1])[None, :] < count[:, None]
        xyxy = boxes[:, :, [1, 0, 3, 2]]
        return xyxy.astype(np.float32), False, np.rint(cls_raw).astype(np.int64), scores, valid
    raise ModelError(f"unknown detection layout {layout!r} (known: {', '.join(DETECTION_LAYOUTS)})")


def _pairwise_iou(b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """IoU of every pair of boxes within each image: [R, K, 4] -> [R, K, K]."""
    area = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    ix1 = np.maximum(b[:, :, None, 0], b[:, None, :, 0])
    iy1 = np.maximum(b[:, :, None, 1], b[:, None, :, 1])
    ix2 = np.minimum(b[:, :, None, 2], b[:, None, :, 2])
    iy2 = np.minimum(b[:, :, None, 3], b[:, None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    union = area[:, :, None] + area[:, None, :] - inter
    out: npt.NDArray[np.float32] = inter / np.maximum(union, 1e-12)
    return out


def iou_matrix(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """IoU of every xyxy box of ``a`` [N, 4] with every one of ``b`` [M, 4]: [N, M]."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    pa = np.asarray(a, dtype=np.float64)[:, None, :]
    pb = np.asarray(b, dtype=np.float64)[None, :, :]
    w = np.clip(np.minimum(pa[..., 2], pb[..., 2]) - np.maximum(pa[..., 0], pb[..., 0]), 0, None)
    h = np.clip(np.minimum(pa[..., 3], pb[..., 3]) - np.maximum(pa[..., 1], pb[..., 1]), 0, None)
    inter = w * h
    area_a = (pa[..., 2] - pa[..., 0]) * (pa[..., 3] - pa[..., 1])
    area_b = (pb[..., 2] - pb[..., 0]) * (pb[..., 3] - pb[..., 1])
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out: npt.NDArray[np.float64] = np.where(union > 0, inter / union, 0.0)
    return out


def nms_indices(
    boxes: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou_threshold: float
) -> npt.NDArray[np.int64]:
    """Greedy NMS over the boxes of one class: the indices kept, best score first (a box
    goes when its IoU with a kept, better box is above ``iou_threshold``)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    if len(order) <= 1:
        return order.astype(np.int64)
    iou = _pairwise_iou(np.asarray(boxes, dtype=np.float32)[order][None])[0]
    alive = np.ones(len(order), dtype=bool)
    for i in range(len(order) - 1):
        if alive[i]:
            alive[i + 1 :] &= iou[i, i + 1 :] <= iou_threshold
    kept: npt.NDArray[np.int64] = order[alive].astype(np.int64)
    return kept


def _decode_padded(
    outputs: Sequence[npt.NDArray[Any]],
    spec: DetectionSpec,
    image_size: tuple[int, int] | None,
) -> tuple[int, Any, Any, Any, npt.NDArray[np.bool_] | None]:
    """(rows, boxes, classes, scores, kept) padded to the widest image, best first; kept is
    None when no image has a box over the threshold."""
    boxes, centred, classes, scores, valid = _raw_candidates(outputs, spec.layout)
    rows = scores.shape[0]
    passed = valid & (scores >= spec.score_threshold)
    width = int(passed.sum(axis=1).max()) if rows and passed.size else 0
    if width == 0:
        return rows, None, None, None, None
    # Each image's passing boxes, best score first, padded to the widest image.
    key = np.where(passed, scores, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")[:, :width]
    # only the kept boxes are converted and scaled (the same float32 steps per box)
    b = np.take_along_axis(boxes, order[:, :, None], axis=1)
    if centred:
        b = _cxcywh_to_xyxy(b)
    if spec.normalized and image_size is not None:
        # 0..1 shares of the input -> input pixels (what sinks and the golden boxes use)
        h, w = image_size
        b = b * np.array([w, h, w, h], dtype=np.float32)
    c = np.take_along_axis(classes, order, axis=1)
    s = np.take_along_axis(scores, order, axis=1)
    alive = np.take_along_axis(passed, order, axis=1)
    iou = _pairwise_iou(b)
    suppress = (iou > spec.iou_threshold) & (c[:, :, None] == c[:, None, :])
    for i in range(width - 1):
        # a kept box i removes the worse boxes of its class that overlap it too much
        alive[:, i + 1 :] &= ~(alive[:, i : i + 1] & suppress[:, i, i + 1 :])
    alive &= np.cumsum(alive, axis=1) <= spec.max_detections
    return rows, b, c, s, alive


def decode_batch(
    outputs: Sequence[npt.NDArray[Any]],
    spec: DetectionSpec,
    image_size: tuple[int, int] | None = None,
) -> list[Detections]:
    """Every image's detections: layout decode, score threshold, per-class greedy NMS (a box
    goes when its IoU with a kept, better box of its class is above ``iou_threshold``), the
    best ``max_detections`` by score. All images at once, so a gate over a golden set pays
    numpy's per-call cost once per step, not once per image."""
    rows, b, c, s, alive = _decode_padded(outputs, spec, image_size)
    if alive is None:
        empty = Detections(
            np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
        )
        return [empty] * rows
    out: list[Detections] = []
    for r in range(rows):
        keep = alive[r]
        out.append(
            Detections(
                b[r][keep].astype(np.float32),
                c[r][keep].astype(np.int64),
                s[r][keep].astype(np.float32),
            )
        )
    return out


def decode_flat(
    outputs: Sequence[npt.NDArray[Any]],
    spec: DetectionSpec,
    image_size: tuple[int, int] | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[Any], npt.NDArray[Any]]:
    """decode_batch() as flat arrays over all images: (image index, class, xyxy box, score),
    each image's boxes best first; what the gate scores (no per-image objects)."""
    _, b, c, s, alive = _decode_padded(outputs, spec, image_size)
    if alive is None:
        none = np.zeros(0, dtype=np.int64)
        return none, none, np.zeros((0, 4)), np.zeros(0)
    img, slot = np.nonzero(alive)
    return (
        img.astype(np.int64),
        c[img, slot].astype(np.int64),
        b[img, slot].astype(np.float64),
        s[img, slot].astype(np.float64),
    )


def decode(
    outputs: Sequence[npt.NDArray[Any]],
    spec: DetectionSpec,
    row: int = 0,
    image_size: tuple[int, int] | None = None,
) -> Detections:
    """One image's detections (row ``row`` of a batch output), as decode_batch."""
    return decode_batch([np.asarray(o)[row : row + 1] for o in outputs], spec, image_size)[0]


def infer_layout(shapes: Sequence[Sequence[int | None]]) -> str:
    """A best guess at the layout from the output shapes (for a bare model file without a
    package naming it): four outputs are SSD, one [N, a, b] with a < b and a small is the
    transposed YOLO, else YOLO."""
    if len(shapes) >= 3:
        return "ssd"
    shape = list(shapes[0]) if shapes else []
    if len(shape) == 3:
        a, b = shape[1], shape[2]
        if a is not None and b is not None and a < b and a <= 256:
            return "yolo_transposed"
    return "yolo"


def segmentation_summary(
    output: npt.NDArray[Any], labels: Sequence[str] = (), row: int = 0
) -> dict[str, Any]:
    """A segmentation output [N, classes, H, W] of one image as class pixel shares (argmax
    per pixel), largest first: what sinks and telemetry carry instead of a class."""
    scores = np.asarray(output[row])
    if scores.ndim != 3:
        raise ModelError(f"segmentation needs outputs [N, classes, H, W], got {np.shape(output)}")
    winners = scores.argmax(axis=0).reshape(-1)
    counts = np.bincount(winners, minlength=scores.shape[0])
    total = max(1, int(winners.size))
    shares = []
    for cls in np.argsort(-counts, kind="stable"):
        if counts[cls] == 0:
            break
        item: dict[str, Any] = {"class": int(cls), "share": round(int(counts[cls]) / total, 6)}
        if int(cls) < len(labels):
            item["label"] = labels[int(cls)]
        shares.append(item)
    return {"pixels": int(winners.size), "classes": shares}


def input_image_size(shape: Sequence[int | None], layout: str) -> tuple[int, int] | None:
    """(height, width) of a model input [N, C, H, W] / [N, H, W, C], None when unknown."""
    dims = list(shape[1:])
    if len(dims) != 3:
        return None
    h, w = (dims[1], dims[2]) if layout == "NCHW" else (dims[0], dims[1])
    return (int(h), int(w)) if h is not None and w is not None else None


@dataclass(frozen=True)
class RowResult:
    """One frame's result for sinks and telemetry: the sink key and value, the class and
    confidence telemetry and probation follow, and the box scores (detection)."""

    key: str
    value: Any
    top_class: int
    confidence: float
    box_scores: tuple[float, ...] | None = None


def spec_of(pre: Any) -> DetectionSpec:
    """The DetectionSpec of a PreprocessConfig (task detection with a named layout)."""
    return DetectionSpec(
        layout=pre.detection_layout or "yolo",
        score_threshold=pre.score_threshold,
        iou_threshold=pre.iou_threshold,
        max_detections=pre.max_detections,
        box_units=pre.box_units,
    )


def row_result(
    outputs: Sequence[npt.NDArray[Any]],
    pre: Any,
    labels: Sequence[str],
    row: int,
    image_size: tuple[int, int] | None = None,
) -> RowResult:
    """A detector's or segmenter's result for one frame (``pre``: the model's
    PreprocessConfig, whose task, thresholds and detection_layout decide)."""
    if pre.task == "segmentation":
        summary = segmentation_summary(outputs[0], labels, row)
        top = summary["classes"][0] if summary["classes"] else {"class": -1, "share": 0.0}
        return RowResult("segmentation", summary, int(top["class"]), float(top["share"]))
    if not pre.detection_layout:
        from agent.pipeline.postprocess import detections

        found = detections(outputs, pre.score_threshold, pre.iou_threshold, labels, row)
        scores = tuple(float(d["score"]) for d in found)
    else:
        dets = decode(outputs, spec_of(pre), row, image_size)
        found = dets.to_list(labels)
        scores = tuple(float(v) for v in dets.scores.tolist())
    if found:
        return RowResult("detections", found, int(found[0]["class"]), scores[0], scores)
    return RowResult("detections", found, -1, 0.0, scores)
