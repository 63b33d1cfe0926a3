"""Pure classification metrics the golden gate compares: accuracy, F1, ECE, agreement, drift."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ECE_BINS = 15
# Probabilities are clipped to this before a log so an exact zero does not give inf.
PROB_EPS = 1e-12


def as_probabilities(outputs: npt.NDArray[Any]) -> FloatArray:
    """Softmax of logits, or the outputs as they are when every row already sums to one."""
    x = np.asarray(outputs, dtype=np.float64)
    if np.all(x >= 0.0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        probs: FloatArray = x / x.sum(axis=1, keepdims=True)
        return probs
    shifted = x - x.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def probabilities_of_each(outputs: Sequence[npt.NDArray[Any]]) -> FloatArray:
    """as_probabilities() of several models' outputs over the same rows, stacked
    ``[models, rows, classes]`` and computed in one go (half the numpy calls for two)."""
    x = np.stack([np.asarray(o, dtype=np.float64) for o in outputs])
    e = np.exp(x - x.max(axis=2, keepdims=True))
    probs: FloatArray = e / e.sum(axis=2, keepdims=True)
    # Logits almost always hold a negative value, so the row sums are checked only for a
    # model whose outputs are all non-negative (np.allclose(sums, 1, atol=1e-3) as before).
    for i in np.flatnonzero(x.min(axis=(1, 2)) >= 0.0).tolist():
        sums = x[i].sum(axis=1)
        if np.all(np.abs(sums - 1.0) <= 1e-3 + 1e-5):
            probs[i] = x[i] / sums[:, None]
    return probs


def confusion_matrix(labels: IntArray, predicted: IntArray, num_classes: int) -> IntArray:
    """Rows are true classes, columns predicted classes (the scikit-learn layout)."""
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    out: IntArray = counts.reshape(num_classes, num_classes).astype(np.int64)
    return out


def accuracy(labels: IntArray, predicted: IntArray) -> float:
    return float(np.mean(labels == predicted)) if len(labels) else 0.0


def precision_recall_f1(
    confusion: IntArray,
) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
    """Per-class precision, recall, F1 and support; 0 where a ratio has no denominator."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    return precision, recall, f1, support.astype(np.int64)


def macro_f1(confusion: IntArray, f1: FloatArray | None = None) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (as scikit-learn).

    ``f1`` may pass precision_recall_f1(confusion)[2] when the caller already has it."""
    if f1 is None:
        f1 = precision_recall_f1(confusion)[2]
    present = (confusion.sum(axis=1) > 0) | (confusion.sum(axis=0) > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def expected_calibration_error(
    probs: FloatArray,
    labels: IntArray,
    bins: int = ECE_BINS,
    predicted: IntArray | None = None,
) -> float:
    """ECE over equal-width confidence bins (lo, hi]: sum of |accuracy - confidence| * share.

    ``predicted`` may pass probs.argmax(axis=1) when the caller already has it."""
    confidence = probs.max(axis=1)
    if predicted is None:
        predicted = probs.argmax(axis=1)
    correct = (predicted == labels).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    return float(np.abs(correct_sum - conf_sum).sum() / max(1, len(labels)))


def top1_agreement(probs_a: FloatArray, probs_b: FloatArray) -> float:
    return float(np.mean(probs_a.argmax(axis=1) == probs_b.argmax(axis=1)))


def probability_mse(probs_a: FloatArray, probs_b: FloatArray) -> float:
    """Mean over rows and classes of the squared softmax-probability difference."""
    return float(np.mean((probs_a - probs_b) ** 2))


def kl_divergence(probs_ref: FloatArray, probs_new: FloatArray) -> float:
    """Mean over rows of KL(ref || new) in nats."""
    p = np.clip(probs_ref, PROB_EPS, 1.0)
    q = np.clip(probs_new, PROB_EPS, 1.0)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def row_cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> FloatArray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (1.0 for two zeros)."""
    a64 = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b64 = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    dot = np.einsum("ij,ij->i", a64, b64)
    norms = np.sqrt(np.einsum("ij,ij->i", a64, a64) * np.einsum("ij,ij->i", b64, b64))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(norms > 0, dot / norms, np.where(dot == 0, 1.0, 0.0))
    out: FloatArray = cos.astype(np.float64)
    return out


SliceIndex = tuple[list[str], IntArray]


def slice_index(slices: npt.NDArray[Any]) -> SliceIndex:
    """Slice ids (as strings, sorted) and each row's position among them: computed once per
    golden set, not once per model (sorting string ids is the costly part)."""
    names, codes = np.unique(slices, return_inverse=True)
    return [str(n) for n in names.tolist()], codes.astype(np.int64).reshape(-1)


def per_slice_accuracy(
    labels: IntArray, predicted: IntArray, slices: npt.NDArray[Any] | SliceIndex
) -> dict[str, dict[str, float]]:
    """Accuracy and row count per slice id (ids shown as strings for the JSON report)."""
    names, codes = slices if isinstance(slices, tuple) else slice_index(slices)
    rows = np.bincount(codes, minlength=len(names))
    correct = np.bincount(codes, weights=(labels == predicted), minlength=len(names))
    return {
        name: {"rows": int(rows[i]), "accuracy": float(correct[i] / rows[i])}
        for i, name in enumerate(names)
    }


def classification_metrics(
    outputs: npt.NDArray[Any],
    labels: IntArray,
    slices: npt.NDArray[Any] | SliceIndex | None = None,
    class_names: Sequence[str] | None = None,
    probs: FloatArray | None = None,
) -> dict[str, Any]:
    """Every single-model metric of one model's outputs over the golden set, as plain data.

    ``probs`` may pass as_probabilities(outputs) and ``slices`` a slice_index() when the
    caller already has them."""
    stacked = None if probs is None else np.asarray(probs, dtype=np.float64)[None]
    return classification_metrics_of_each([outputs], labels, slices, class_names, stacked)[0]


def classification_metrics_of_each(
    outputs: Sequence[npt.NDArray[Any]],
    labels: IntArray,
    slices: npt.NDArray[Any] | SliceIndex | None = None,
    class_names: Sequence[str] | None = None,
    probs: FloatArray | None = None,
) -> list[dict[str, Any]]:
    """classification_metrics() of several models over the same golden rows, computed on
    stacked arrays (the gate judges two models; each numpy call costs the same for both).

    ``probs`` may pass probabilities_of_each(outputs), ``[models, rows, classes]``."""
    models, num_classes = len(outputs), int(outputs[0].shape[1])
    rows = len(labels)
    if probs is None:
        probs = probabilities_of_each(outputs)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probs.argmax(axis=2)  # [models, rows]
    confidence = probs.max(axis=2)
    correct = predicted == labels
    cm, support, precision, recall, f1, present = _per_class_of_each(labels, predicted, num_classes)
    ece = _ece_of_each(confidence, correct)
    accuracy_of = correct.mean(axis=1) if rows else np.zeros(models)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    names += [str(i) for i in range(len(names), num_classes)]
    per_slice = None if slices is None else _per_slice_of_each(correct, slices)
    support_l, precision_l = support.tolist(), precision.tolist()
    recall_l, f1_l, cm_l = recall.tolist(), f1.tolist(), cm.tolist()
    accuracy_l, ece_l = accuracy_of.tolist(), ece.tolist()
    confidence_mean = confidence.mean(axis=1).tolist() if rows else [0.0] * models
    out: list[dict[str, Any]] = []
    for m in range(models):
        macro = float(f1[m][present[m]].mean()) if present[m].any() else 0.0
        metrics: dict[str, Any] = {
            "rows": rows,
            "accuracy": float(accuracy_l[m]),
            "macro_f1": macro,
            "ece": float(ece_l[m]),
            # probation holds the candidate's live confidence to this (agent/ota/probation.py)
            "confidence_mean": float(confidence_mean[m]),
            "per_class": [
                {"class": name, "support": sup, "precision": pr, "recall": rc, "f1": f}
                for name, sup, pr, rc, f in zip(
                    names, support_l[m], precision_l[m], recall_l[m], f1_l[m]
                )
            ],
            "confusion_matrix": cm_l[m],
        }
        if per_slice is not None:
            metrics["per_slice"] = per_slice[m]
        out.append(metrics)
    return out


def _per_class_of_each(
    labels: IntArray, predicted: IntArray, num_classes: int
) -> tuple[IntArray, IntArray, FloatArray, FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """Every model's confusion matrix (rows: true classes), support, precision, recall and
    F1 per class, and which classes count for macro F1: those present in labels or
    predictions (as scikit-learn). ``predicted`` is ``[models, rows]``."""
    models = len(predicted)
    model_ids = np.arange(models, dtype=np.int64)[:, None]
    # Every model's confusion matrix from one bincount.
    cells = model_ids * (num_classes * num_classes) + labels * num_classes + predicted
    cm = np.bincount(cells.ravel(), minlength=models * num_classes * num_classes).reshape(
        models, num_classes, num_classes
    )
    diagonal = np.arange(num_classes)
    tp = cm[:, diagonal, diagonal].astype(np.float64)
    predicted_count = cm.sum(axis=1)
    support = cm.sum(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted_count > 0, tp / predicted_count, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    present = (support > 0) | (predicted_count > 0)
    return cm, support, precision, recall, f1, present


def _ece_of_each(confidence: FloatArray, correct: npt.NDArray[np.bool_]) -> FloatArray:
    """Every model's expected calibration error from ``[models, rows]`` top-1 confidences."""
    models, rows = confidence.shape
    model_ids = np.arange(models, dtype=np.int64)[:, None]
    # ECE: bin i holds confidences in (i/bins, (i+1)/bins]; exactly 0 joins bin 0.
    bins = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    bins += model_ids * ECE_BINS
    conf_sum = np.bincount(bins.ravel(), weights=confidence.ravel(), minlength=models * ECE_BINS)
    correct_sum = np.bincount(bins.ravel(), weights=correct.ravel(), minlength=models * ECE_BINS)
    ece: FloatArray = np.abs(correct_sum - conf_sum).reshape(models, ECE_BINS).sum(axis=1) / max(
        1, rows
    )
    return ece


def _per_slice_of_each(
    correct: npt.NDArray[np.bool_], slices: npt.NDArray[Any] | SliceIndex
) -> list[dict[str, dict[str, float]]]:
    """Every model's rows and accuracy per slice of the golden set."""
    models = len(correct)
    model_ids = np.arange(models, dtype=np.int64)[:, None]
    slice_names, codes = slices if isinstance(slices, tuple) else slice_index(slices)
    count = len(slice_names)
    slice_rows = np.bincount(codes, minlength=count).tolist()
    slice_correct = np.bincount(
        (model_ids * count + codes).ravel(), weights=correct.ravel(), minlength=models * count
    )
    slice_acc = (slice_correct.reshape(models, count) / np.maximum(slice_rows, 1)).tolist()
    return [
        {
            name: {"rows": int(slice_rows[j]), "accuracy": float(slice_acc[m][j])}
            for j, name in enumerate(slice_names)
        }
        for m in range(models)
    ]


def agreement_metrics(
    baseline_outputs: npt.NDArray[Any],
    candidate_outputs: npt.NDArray[Any],
    baseline_probs: FloatArray | None = None,
    candidate_probs: FloatArray | None = None,
) -> dict[str, float]:
    """How close the candidate's outputs are to the baseline's, row by row."""
    pb = as_probabilities(baseline_outputs) if baseline_probs is None else baseline_probs
    pc = as_probabilities(candidate_outputs) if candidate_probs is None else candidate_probs
    cos = row_cosine(baseline_outputs, candidate_outputs)
    return {
        "top1_agreement": top1_agreement(pb, pc),
        "prob_mse": probability_mse(pb, pc),
        "kl_divergence": kl_divergence(pb, pc),
        "logit_cosine": float(cos.mean()),
        "logit_cosine_min": float(cos.min()),
    }
