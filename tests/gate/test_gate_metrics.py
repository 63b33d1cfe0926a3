"""Gate metrics checked against scikit-learn and SciPy on the same data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_squared_error,
    precision_recall_fscore_support,
)
from sklearn.metrics.pairwise import cosine_similarity

from agent.ota import gate_metrics as gm


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    n, c = 400, 7
    labels = rng.integers(0, c, n)
    logits_a = rng.standard_normal((n, c)) * 2
    logits_a[np.arange(n), labels] += 2.5  # mostly right, not always
    logits_b = logits_a + rng.standard_normal((n, c)) * 0.7
    return labels, logits_a, logits_b


def test_classification_metrics_match_sklearn(data):
    labels, logits, _ = data
    pred = logits.argmax(1)
    m = gm.classification_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(labels, pred, labels=range(7)).tolist()
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=range(7), zero_division=0)
    for i, row in enumerate(m["per_class"]):
        assert row["precision"] == pytest.approx(p[i])
        assert row["recall"] == pytest.approx(r[i])
        assert row["f1"] == pytest.approx(f[i])
        assert row["support"] == s[i]


def test_macro_f1_with_a_class_never_seen_matches_sklearn():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    logits = np.eye(4)[pred] * 5  # four outputs, class 3 never occurs
    m = gm.classification_metrics(logits, labels)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))


def _ece_loop(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.mean() * abs((pred[mask] == labels[mask]).mean() - conf[mask].mean())
    return total


def test_ece_matches_a_plain_loop_over_15_bins(data):
    labels, logits, _ = data
    probs = gm.as_probabilities(logits)
    assert gm.expected_calibration_error(probs, labels) == pytest.approx(_ece_loop(probs, labels))


def test_ece_of_a_perfectly_calibrated_toy_is_zero_and_overconfidence_shows():
    labels = np.array([0, 1, 0, 1])
    # Confidence 0.5 and half right -> calibrated; confidence 1.0 and half right -> ECE 0.5.
    half = np.array([[0.5, 0.5]] * 4)
    assert gm.expected_calibration_error(half, labels) == pytest.approx(0.0)
    sure = np.array([[1.0, 0.0]] * 4)
    assert gm.expected_calibration_error(sure, labels) == pytest.approx(0.5)


def test_agreement_metrics_match_scipy_and_sklearn(data):
    _, a, b = data
    m = gm.agreement_metrics(a, b)
    pa, pb = gm.as_probabilities(a), gm.as_probabilities(b)
    assert m["top1_agreement"] == pytest.approx(accuracy_score(a.argmax(1), b.argmax(1)))
    assert m["prob_mse"] == pytest.approx(mean_squared_error(pa.ravel(), pb.ravel()))
    assert m["kl_divergence"] == pytest.approx(np.mean(entropy(pa, pb, axis=1)))
    cos = np.diag(cosine_similarity(a, b))
    assert m["logit_cosine"] == pytest.approx(cos.mean())
    assert m["logit_cosine_min"] == pytest.approx(cos.min())


def test_probabilities_are_taken_as_they_are_when_rows_sum_to_one():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert np.allclose(gm.as_probabilities(probs), probs)
    assert np.allclose(gm.as_probabilities(np.log(probs)), probs)


def test_per_slice_accuracy_counts_each_slice():
    labels = np.array([0, 1, 1, 0])
    pred = np.array([0, 1, 0, 1])
    slices = np.array(["dim", "dim", "bold", "bold"])
    out = gm.per_slice_accuracy(labels, pred, slices)
    assert out == {"bold": {"rows": 2, "accuracy": 0.0}, "dim": {"rows": 2, "accuracy": 1.0}}


def test_stacked_metrics_of_two_models_equal_each_model_alone(data):
    labels, a, b = data
    probs_b = gm.as_probabilities(b)  # one model giving probabilities, one giving logits
    slices = np.array(["bold", "thin", "dim", "thin"])[np.arange(len(labels)) % 4]
    stacked = gm.probabilities_of_each([a, probs_b])
    np.testing.assert_allclose(stacked[0], gm.as_probabilities(a), rtol=1e-12)
    np.testing.assert_allclose(stacked[1], probs_b, rtol=1e-12)
    both = gm.classification_metrics_of_each([a, probs_b], labels, slices, None, stacked)
    for got, outputs in zip(both, (a, probs_b)):
        alone = gm.classification_metrics(outputs, labels, slices)
        assert got["confusion_matrix"] == alone["confusion_matrix"]
        assert got["per_slice"] == alone["per_slice"]
        for key in ("accuracy", "macro_f1", "ece"):
            assert got[key] == pytest.approx(alone[key], rel=1e-12)
        for g_row, a_row in zip(got["per_class"], alone["per_class"]):
            assert g_row.pop("class") == a_row.pop("class")
            assert g_row == pytest.approx(a_row, rel=1e-12)
    pred = probs_b.argmax(1)
    assert both[1]["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
