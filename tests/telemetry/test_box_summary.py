"""Interval summaries of a detector: box counts per frame and the box-score histogram."""

from __future__ import annotations

from agent.telemetry.sampler import IntervalSummary


def test_box_counts_and_score_histogram() -> None:
    summary = IntervalSummary(0, 0)
    for scores in ([], [0.95], [0.31, 0.99], [0.5] * 12):
        summary.observe(0.001, 0, scores[0] if scores else 0.0)
        summary.observe_boxes(scores)
    out = summary.finish(1_000_000_000, 1_000_000_000, {}, "normal", 10.0)
    boxes = out["boxes"]
    assert boxes["frames"] == 4 and boxes["total"] == 15
    # frames with 0, 1, 2 boxes and one with 10 or more
    assert boxes["count_counts"] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    # 0.31 -> bin 3, 0.5 x 12 -> bin 5, 0.95 and 0.99 -> bin 9
    assert boxes["score_counts"] == [0, 0, 0, 1, 0, 12, 0, 0, 0, 2]


def test_a_classifier_summary_has_no_boxes() -> None:
    summary = IntervalSummary(0, 0)
    summary.observe(0.001, 3, 0.9)
    assert "boxes" not in summary.finish(1, 1, {}, "normal", 10.0)
