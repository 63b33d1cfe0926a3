"""The gate's checks (DESIGN §7): score both models' golden-set outputs and hold the
candidate to each guard rail."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.ota.gate_data import DETECTION_SPEC_NAME, GateModel, GoldenSet, check_labels_fit
from agent.ota.gate_detection import (
    COCO_MAX_DETS,
    FlatBoxes,
    coco_metrics_flat,
    flatten_boxes,
    mean_iou,
)
from agent.ota.gate_measure import (
    LATENCY_CONFIRM_PASSES,
    MB,
    ConfirmedLatency,
    Measured,
    latency_summaries_ms,
)
from agent.ota.gate_metrics import (
    agreement_metrics,
    classification_metrics_of_each,
    probabilities_of_each,
)
from agent.ota.gate_policy import GatePolicy
from agent.ota.gate_report import GateCheck
from agent.pipeline.detection import (
    DetectionSpec,
    decode_flat,
    detection_spec_from_mapping,
    infer_layout,
)


def _check(name: str, value: float, threshold: float, comparison: str, detail: str) -> GateCheck:
    ok = value >= threshold if comparison == ">=" else value <= threshold
    return GateCheck(name, "pass" if ok else "fail", value, threshold, comparison, detail)


def classification_checks(
    policy: GatePolicy,
    base: Mapping[str, Any],
    cand: Mapping[str, Any],
    agreement: Mapping[str, float],
    same_precision: bool | None,
) -> list[GateCheck]:
    """Accuracy, F1, calibration, agreement, closeness and per-class recall checks."""
    return [
        *_quality_checks(policy, base, cand),
        *_closeness_checks(policy, agreement, same_precision),
        *_class_recall_check(policy, base, cand),
    ]


def _quality_checks(
    policy: GatePolicy, base: Mapping[str, Any], cand: Mapping[str, Any]
) -> list[GateCheck]:
    """Accuracy, macro F1 and ECE of the candidate against the baseline's."""
    d_acc = (cand["accuracy"] - base["accuracy"]) * 100.0
    d_f1 = (cand["macro_f1"] - base["macro_f1"]) * 100.0
    d_ece = cand["ece"] - base["ece"]
    return [
        _check(
            "accuracy",
            d_acc,
            -policy.accuracy_drop_max_pp,
            ">=",
            f"accuracy {base['accuracy']:.2%} -> {cand['accuracy']:.2%} ({d_acc:+.2f} pp)",
        ),
        _check(
            "macro_f1",
            d_f1,
            -policy.f1_drop_max_pp,
            ">=",
            f"macro F1 {base['macro_f1']:.4f} -> {cand['macro_f1']:.4f} ({d_f1:+.2f} pp)",
        ),
        _check(
            "ece",
            d_ece,
            policy.ece_increase_max,
            "<=",
            f"ECE {base['ece']:.4f} -> {cand['ece']:.4f} ({d_ece:+.4f})",
        ),
    ]


def _closeness_checks(
    policy: GatePolicy, agreement: Mapping[str, float], same_precision: bool | None
) -> list[GateCheck]:
    """Top-1 agreement (or a small softmax MSE), and the logit cosine when both models run
    at the same precision (an int8 model's logits are not expected to match fp32's)."""
    agree, mse = agreement["top1_agreement"], agreement["prob_mse"]
    agree_ok = agree >= policy.agreement_min or mse <= policy.prob_mse_max
    checks = [
        GateCheck(
            "agreement",
            "pass" if agree_ok else "fail",
            agree,
            policy.agreement_min,
            ">=",
            f"top-1 agreement {agree:.2%} (min {policy.agreement_min:.2%}) or softmax MSE "
            f"{mse:.2e} (max {policy.prob_mse_max:.1e})",
        )
    ]
    cos = agreement["logit_cosine"]
    if same_precision:
        checks.append(
            _check(
                "logit_cosine",
                cos,
                policy.logit_cosine_min,
                ">=",
                f"logit cosine {cos:.5f} (same precision)",
            )
        )
    else:
        why = "different precision" if same_precision is False else "precision unknown"
        checks.append(
            GateCheck(
                "logit_cosine",
                "skip",
                cos,
                policy.logit_cosine_min,
                ">=",
                f"logit cosine {cos:.5f} not checked ({why})",
            )
        )
    return checks


def _class_recall_check(
    policy: GatePolicy, base: Mapping[str, Any], cand: Mapping[str, Any]
) -> list[GateCheck]:
    """The worst per-class recall drop over the classes the golden set holds (none: no check)."""
    drops = []
    for b, c in zip(base["per_class"], cand["per_class"]):
        if b["support"] > 0:
            drops.append(((b["recall"] - c["recall"]) * 100.0, b["class"], b, c))
    if not drops:
        return []
    drop, cls, b, c = max(drops, key=lambda d: d[0])
    return [
        _check(
            "class_recall",
            drop,
            policy.class_recall_drop_max_pp,
            "<=",
            f"class {cls} recall {b['recall']:.2%} -> {c['recall']:.2%} "
            f"({-drop:+.1f} pp, worst class)",
        )
    ]


def latency_memory_checks(
    policy: GatePolicy, latency: Mapping[str, Any], rss_added_mb: float
) -> list[GateCheck]:
    base_p95 = latency["baseline"]["p95_ms"]
    cand_p95 = latency["candidate"]["p95_ms"]
    limit = policy.latency_p95_ratio_max * base_p95 + policy.latency_p95_slack_ms
    how = ""
    runs = int(latency.get("runs_per_row") or 1)
    first = latency.get("first_pass")
    if runs > 1 and isinstance(first, Mapping):
        how = (
            f"; median of {runs} runs for {latency.get('rows_timed_again', 0)} rows timed "
            f"again, the first pass's p95 {first['baseline']['p95_ms']:.3f} ms -> "
            f"{first['candidate']['p95_ms']:.3f} ms"
        )
    return [
        _check(
            "latency_p95",
            cand_p95,
            limit,
            "<=",
            f"p95 {base_p95:.3f} ms -> {cand_p95:.3f} ms (limit {limit:.3f} ms{how})",
        ),
        _check(
            "memory",
            rss_added_mb,
            policy.memory_added_max_mb,
            "<=",
            f"candidate added {rss_added_mb:.1f} MB RSS",
        ),
    ]


def segmentation_checks(
    policy: GatePolicy, base: Mapping[str, Any], cand: Mapping[str, Any]
) -> list[GateCheck]:
    d = (cand["miou"] - base["miou"]) * 100.0
    return [
        _check(
            "miou",
            d,
            -policy.miou_drop_max_pp,
            ">=",
            f"mIoU {base['miou']:.4f} -> {cand['miou']:.4f} ({d:+.2f} pp)",
        )
    ]


def detection_checks(
    policy: GatePolicy, base: Mapping[str, Any], cand: Mapping[str, Any]
) -> list[GateCheck]:
    """ΔmAP@0.5 from two detection_map() results, naming the class whose AP fell most."""
    d = (cand["map"] - base["map"]) * 100.0
    worst = ""
    drops = {
        k: base["per_class_ap"][k] - cand["per_class_ap"].get(k, 0.0) for k in base["per_class_ap"]
    }
    if drops:
        k = max(drops, key=lambda key: drops[key])
        worst = f"; worst class {k} AP {-drops[k] * 100:+.1f} pp"
    return [
        _check(
            "map50",
            d,
            -policy.map_drop_max_pp,
            ">=",
            f"mAP@0.5 {base['map']:.4f} -> {cand['map']:.4f} ({d:+.2f} pp{worst})",
        )
    ]


def detection_gate_checks(
    policy: GatePolicy,
    base: Mapping[str, Any],
    cand: Mapping[str, Any],
    class_names: Sequence[str] = (),
) -> list[GateCheck]:
    """ΔmAP@0.5, ΔmAP@0.5:0.95 and the worst per-class AP@0.5 drop, from two
    coco_detection_metrics() results; the class whose AP fell most is named."""

    def name(k: str) -> str:
        i = int(k)
        return f"class {k} ({class_names[i]})" if 0 <= i < len(class_names) else f"class {k}"

    d50 = (cand["map50"] - base["map50"]) * 100.0
    d5095 = (cand["map50_95"] - base["map50_95"]) * 100.0
    base_ap, cand_ap = base["per_class_ap50"], cand["per_class_ap50"]
    drops = {k: (base_ap[k] - cand_ap.get(k, 0.0)) * 100.0 for k in base_ap}
    checks = [
        _check(
            "map50",
            d50,
            -policy.map_drop_max_pp,
            ">=",
            f"mAP@0.5 {base['map50']:.4f} -> {cand['map50']:.4f} ({d50:+.2f} pp)",
        ),
        _check(
            "map50_95",
            d5095,
            -policy.map50_95_drop_max_pp,
            ">=",
            f"mAP@0.5:0.95 {base['map50_95']:.4f} -> {cand['map50_95']:.4f} ({d5095:+.2f} pp)",
        ),
    ]
    if drops:
        worst = max(drops, key=lambda k: drops[k])
        checks.append(
            _check(
                "class_ap",
                drops[worst],
                policy.class_ap_drop_max_pp,
                "<=",
                f"{name(worst)} AP@0.5 {base_ap[worst]:.4f} -> {cand_ap.get(worst, 0.0):.4f} "
                f"({-drops[worst]:+.1f} pp, worst class)",
            )
        )
    return checks


def detection_spec_of(
    model: GateModel, golden: GoldenSet, output_shape: Sequence[int]
) -> DetectionSpec:
    """How to decode a model's outputs: its package's `detection` block, else the golden
    set's detection.yaml, else the defaults with the layout guessed from the output."""
    block = (model.manifest or {}).get("detection")
    if isinstance(block, Mapping):
        return detection_spec_from_mapping(block, f"{model.label}: manifest")
    if golden.detection is not None:
        return detection_spec_from_mapping(golden.detection, str(golden.path / DETECTION_SPEC_NAME))
    return DetectionSpec(layout=infer_layout([tuple(output_shape)]))


def golden_image_size(golden: GoldenSet) -> tuple[int, int]:
    """(height, width) of the golden inputs: NCHW when the second axis looks like channels."""
    shape = golden.inputs.shape
    if len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        return int(shape[2]), int(shape[3])
    if len(shape) >= 3:
        return int(shape[1]), int(shape[2])
    return 1, 1


def detection_metrics(
    golden: GoldenSet, outputs: npt.NDArray[np.float32], spec: DetectionSpec
) -> dict[str, Any]:
    """Decode one model's golden-set outputs with its spec and score them (COCO rules)."""
    assert golden.boxes is not None
    num_classes = len(golden.class_names)
    if spec.layout == "ssd":
        parts = _ssd_outputs(outputs)
    else:
        width = outputs.shape[2] if spec.layout == "yolo" and outputs.ndim == 3 else 0
        if spec.layout == "yolo_transposed" and outputs.ndim == 3:
            width = outputs.shape[1]
        model_classes = width - (5 if spec.layout == "yolo" else 4)
        if outputs.ndim != 3 or model_classes != num_classes:
            raise ModelError(
                f"{spec.layout} output {list(outputs.shape[1:])} does not fit the golden set's "
                f"{num_classes} categories"
            )
        parts = [outputs]
    flat = decode_flat(parts, spec, golden_image_size(golden))
    result = coco_metrics_flat(
        flat_ground_truth(golden), flat, num_classes, min(spec.max_detections, COCO_MAX_DETS)
    )
    result["boxes_per_image"] = result["det_boxes"] / max(1, golden.rows)
    # the daemon's per-frame confidence for a detector: its best box's score (0 without)
    best = np.zeros(golden.rows)
    np.maximum.at(best, flat[0], flat[3])
    result["top_score_mean"] = float(best.mean())
    # what probation holds a detector's live boxes to (agent.ota.probation.box_collapse)
    result["box_score_mean"] = float(flat[3].mean()) if len(flat[3]) else 0.0
    return result


_FLAT_GT: dict[str, FlatBoxes] = {}


def flat_ground_truth(golden: GoldenSet) -> FlatBoxes:
    """The golden boxes as flat arrays, made once per golden set (keyed by its hash)."""
    assert golden.boxes is not None
    key = f"{golden.sha256}:{len(golden.class_names)}"
    if key not in _FLAT_GT:
        _FLAT_GT.clear()  # one golden set per device: keep only the latest
        _FLAT_GT[key] = flatten_boxes(golden.boxes, len(golden.class_names))
    return _FLAT_GT[key]


def _ssd_outputs(packed: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    """Packed SSD rows [N, 6K (+1)] back into boxes [N,K,4], classes [N,K], scores [N,K] and
    count [N] when present (6K + 1 values a row)."""
    rows, total = packed.shape[0], int(np.prod(packed.shape[1:]))
    flat = packed.reshape(rows, total)
    k = (total - 1) // 6 if total % 6 == 1 else total // 6
    if k < 1 or total not in (6 * k, 6 * k + 1):
        raise ModelError(f"ssd outputs of {total} values a row are not boxes, classes, scores")
    parts = [flat[:, : 4 * k].reshape(rows, k, 4), flat[:, 4 * k : 5 * k], flat[:, 5 * k : 6 * k]]
    if total == 6 * k + 1:
        parts.append(flat[:, 6 * k])
    return parts


def judge(
    golden: GoldenSet,
    policy: GatePolicy,
    base: Measured,
    cand: Measured,
    base_precision: str,
    cand_precision: str,
    class_names: list[str] | None,
    detection_specs: tuple[DetectionSpec, DetectionSpec] | None = None,
    confirmed: ConfirmedLatency | None = None,
) -> tuple[dict[str, Any], list[GateCheck]]:
    """The metrics of both models and every check of the candidate, quality first, then
    latency and memory."""
    latency = latency_metrics(base, cand, confirmed)
    memory = {
        "baseline_rss_added_mb": base.rss_added_bytes / MB,
        "candidate_rss_added_mb": cand.rss_added_bytes / MB,
    }
    metrics: dict[str, Any] = {"task": golden.task, "latency": latency, "memory": memory}
    checks: list[GateCheck] = []
    if golden.task == "detection":
        assert detection_specs is not None
        checks += _judge_detection(golden, policy, base, cand, detection_specs, metrics)
    elif golden.task == "segmentation":
        checks += _judge_segmentation(golden, policy, base, cand, metrics)
    else:
        known = "unknown" not in (base_precision, cand_precision)
        same_precision = (base_precision == cand_precision) if known else None
        checks += _judge_classification(
            golden, policy, base, cand, class_names, same_precision, metrics
        )
    checks += latency_memory_checks(policy, latency, cand.rss_added_bytes / MB)
    return metrics, checks


def latency_metrics(
    base: Measured, cand: Measured, confirmed: ConfirmedLatency | None
) -> dict[str, Any]:
    """Both models' latency summaries: the first pass's, or the confirming passes' when the
    first failed on latency (the first pass then stays in the report as ``first_pass``)."""
    base_ms, cand_ms = latency_summaries_ms(base.latencies_s, cand.latencies_s)
    latency: dict[str, Any] = {
        "baseline": base_ms,
        "candidate": cand_ms,
        "baseline_from_cache": base.from_cache,
        "runs_per_row": 1,
    }
    if confirmed is not None:
        latency["first_pass"] = {"baseline": base_ms, "candidate": cand_ms}
        latency["baseline"], latency["candidate"] = latency_summaries_ms(
            confirmed.baseline_s, confirmed.candidate_s
        )
        latency["runs_per_row"] = LATENCY_CONFIRM_PASSES + 1
        latency["rows_timed_again"] = confirmed.rows_timed_again
        latency["baseline_from_cache"] = False
    return latency


def _judge_detection(
    golden: GoldenSet,
    policy: GatePolicy,
    base: Measured,
    cand: Measured,
    specs: tuple[DetectionSpec, DetectionSpec],
    metrics: dict[str, Any],
) -> list[GateCheck]:
    """COCO figures of both detectors (each decoded by its own spec) into ``metrics``."""
    b, c = (
        detection_metrics(golden, measured.outputs, spec)
        for measured, spec in zip((base, cand), specs)
    )
    metrics.update({"baseline": b, "candidate": c})
    metrics["detection"] = {"baseline": specs[0].to_dict(), "candidate": specs[1].to_dict()}
    return detection_gate_checks(policy, b, c, golden.class_names)


def _judge_segmentation(
    golden: GoldenSet,
    policy: GatePolicy,
    base: Measured,
    cand: Measured,
    metrics: dict[str, Any],
) -> list[GateCheck]:
    """Mean IoU of both models' argmax masks against the label masks into ``metrics``."""
    if base.outputs.ndim != 4 or base.outputs.shape[2:] != golden.labels.shape[1:]:
        raise ModelError(
            f"segmentation output shape {list(base.outputs.shape[1:])} does not match "
            f"the label masks {list(golden.labels.shape[1:])}"
        )
    classes = int(base.outputs.shape[1])
    check_labels_fit(golden, classes)
    b = mean_iou(golden.labels, base.outputs.argmax(axis=1), classes)
    c = mean_iou(golden.labels, cand.outputs.argmax(axis=1), classes)
    metrics.update({"baseline": b, "candidate": c})
    return segmentation_checks(policy, b, c)


def _judge_classification(
    golden: GoldenSet,
    policy: GatePolicy,
    base: Measured,
    cand: Measured,
    class_names: list[str] | None,
    same_precision: bool | None,
    metrics: dict[str, Any],
) -> list[GateCheck]:
    """Both classifiers' metrics and their agreement into ``metrics``."""
    if base.outputs.ndim != 2:
        raise ModelError(
            f"classification needs outputs [N, classes], got {list(base.outputs.shape)}"
        )
    classes = int(base.outputs.shape[1])
    check_labels_fit(golden, classes)
    # Both models in one set of numpy calls: on a cache-cold CPU right after the timed
    # pass, each call costs several µs whatever the array size.
    probs = probabilities_of_each([base.outputs, cand.outputs])
    b, c = classification_metrics_of_each(
        [base.outputs, cand.outputs], golden.labels, golden.slices, class_names, probs
    )
    agreement = agreement_metrics(base.outputs, cand.outputs, probs[0], probs[1])
    metrics.update({"baseline": b, "candidate": c, "agreement": agreement})
    if golden.reference is not None and golden.reference.shape == cand.outputs.shape:
        # Informational: how far each model is from the trusted reference outputs.
        metrics["reference"] = {
            "baseline": agreement_metrics(golden.reference, base.outputs),
            "candidate": agreement_metrics(golden.reference, cand.outputs),
        }
    return classification_checks(policy, b, c, agreement, same_precision)
