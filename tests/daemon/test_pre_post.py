"""Preprocessing from the schema (resize, colour, layout, mean/std); top-k and NMS."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import PreprocessConfig
from agent.errors import ConfigError, InputDataError
from agent.pipeline.postprocess import detections, nms, softmax, top_k, top_k_rows
from agent.pipeline.preprocess import Preprocessor, preprocess_from_manifest, resize_nearest
from agent.pipeline.sources import Frame
from agent.runtime.base import TensorSpec


def frame(data: np.ndarray, ready: bool = False) -> Frame:
    return Frame(seq=1, data=data, source="test", ready=ready)


def test_gray_nchw_with_scale_matches_the_digits_schema() -> None:
    pre = Preprocessor(
        PreprocessConfig(color_order="GRAY", scale=1 / 255),
        TensorSpec("input", "float32", (None, 1, 8, 8)),
    )
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = pre.batch([frame(img)])
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    # 2x2 area mean of the 16x16 ramp, scaled to [0, 1]
    expected = img.reshape(8, 2, 8, 2).astype(np.float32).mean(axis=(1, 3)) / 255
    # OpenCV (when installed) rounds the mean back to uint8: allow half a grey level
    np.testing.assert_allclose(x[0, 0], expected, atol=0.51 / 255)


def test_rgb_frame_to_bgr_nhwc_with_mean_std() -> None:
    cfg = PreprocessConfig(
        layout="NHWC", color_order="BGR", mean=[1.0, 2.0, 3.0], std=[2.0, 2.0, 2.0]
    )
    pre = Preprocessor(cfg, TensorSpec("input", "float32", (None, 2, 2, 3)))
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30  # R, G, B
    x = pre.batch([frame(img), frame(img)])
    assert x.shape == (2, 2, 2, 3)
    assert x[1, 0, 0].tolist() == [(30 - 1) / 2, (20 - 2) / 2, (10 - 3) / 2]


def test_rgb_to_gray_uses_luma_weights() -> None:
    pre = Preprocessor(
        PreprocessConfig(color_order="GRAY"), TensorSpec("x", "float32", (None, 1, 1, 1))
    )
    img = np.array([[[100, 200, 50]]], np.uint8)
    assert pre.batch([frame(img)])[0, 0, 0, 0] == pytest.approx(
        0.299 * 100 + 0.587 * 200 + 0.114 * 50, rel=1e-5
    )


def test_gray_frame_is_repeated_for_an_rgb_model() -> None:
    pre = Preprocessor(PreprocessConfig(), TensorSpec("x", "float32", (None, 3, 4, 4)))
    x = pre.batch([frame(np.full((4, 4), 7, np.uint8))])
    assert x.shape == (1, 3, 4, 4) and np.all(x == 7)


def test_ready_tensor_passes_through_and_wrong_shapes_are_named() -> None:
    pre = Preprocessor(PreprocessConfig(), TensorSpec("x", "float32", (None, 3, 4, 4)))
    t = np.random.default_rng(0).random((3, 4, 4), dtype=np.float32)
    assert np.array_equal(pre.batch([frame(t, ready=True)])[0], t)
    with pytest.raises(InputDataError, match="frame becomes shape"):
        pre.batch([frame(np.zeros((3, 5, 5), np.float32), ready=True)])


def test_mean_with_wrong_channel_count_is_refused() -> None:
    with pytest.raises(InputDataError, match=r"preprocess.mean"):
        Preprocessor(PreprocessConfig(mean=[1.0, 2.0]), TensorSpec("x", "float32", (None, 3, 4, 4)))


def test_manifest_preprocess_block_and_its_errors() -> None:
    cfg = preprocess_from_manifest(
        {
            "resize": [8, 8],
            "layout": "NCHW",
            "color_order": "GRAY",
            "mean": [0.0],
            "std": [1.0],
            "scale": 0.5,
        },
        "m.json",
    )
    assert cfg.resize == (8, 8) and cfg.scale == 0.5
    with pytest.raises(ConfigError, match=r"m.json:preprocess.layout"):
        preprocess_from_manifest({"layout": "CHW"}, "m.json")


def test_resize_nearest_without_opencv() -> None:
    img = np.arange(12).reshape(3, 4)
    assert resize_nearest(img, 6, 8).shape == (6, 8)
    assert resize_nearest(img, 3, 4) is img


def test_top_k_with_labels_and_probabilities() -> None:
    logits = np.array([1.0, 3.0, 2.0])
    best = top_k(logits, 2, ["a", "b", "c"])
    assert [b["label"] for b in best] == ["b", "c"]
    assert best[0]["score"] == pytest.approx(float(softmax(logits)[1]), abs=1e-6)
    probs = np.array([0.1, 0.2, 0.7])
    assert top_k(probs, 1)[0] == {"class": 2, "score": pytest.approx(0.7)}


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.8, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.5) == [1, 2]


def test_detections_threshold_and_per_class_nms() -> None:
    out = np.array(
        [
            [
                [0, 0, 10, 10, 0.9, 0],
                [1, 1, 10, 10, 0.8, 0],
                [1, 1, 10, 10, 0.85, 1],
                [5, 5, 6, 6, 0.1, 0],
            ]
        ],
        np.float32,
    )
    found = detections([out], score_threshold=0.25, iou_threshold=0.5, labels=["cat", "dog"])
    assert [(d["label"], d["score"]) for d in found] == [
        ("cat", pytest.approx(0.9)),
        ("dog", pytest.approx(0.85)),
    ]


def test_top_one_matches_the_float32_softmax_path() -> None:
    # top_k(row, 1) takes a plain-Python path for small rows; class and score must agree
    # with the numpy path (argsort of the float32 softmax) it replaces per frame
    rng = np.random.default_rng(7)
    rows = [rng.normal(0.0, s, n).astype(np.float32) for s in (0.1, 3.0, 50.0) for n in (1, 10)]
    rows += [softmax(r) for r in rows] + [np.array([1.0, 3.0, 3.0, 2.0], np.float32)]
    for row in rows:
        probs = row if np.all(row >= 0) and abs(float(row.sum()) - 1.0) < 1e-3 else softmax(row)
        want = int(np.argsort(-probs, kind="stable")[0])
        got = top_k(row, 1, ["x"] * row.size)[0]
        assert got["class"] == want and got["label"] == "x"
        assert got["score"] == pytest.approx(float(probs[want]), abs=1.5e-6)
    # a row larger than the plain-Python limit goes through numpy and gives the same answer
    big = rng.normal(0.0, 1.0, 1000).astype(np.float32)
    assert top_k(big, 1)[0]["class"] == int(np.argmax(big))


@pytest.mark.parametrize(
    ("shape", "dtype", "k"),
    [
        ((3, 10), np.float32, 1),  # the per-frame fast path: one tolist() for the batch
        ((1, 10), np.float16, 1),
        ((2, 10), np.float64, 1),
        ((2, 10), np.float32, 3),  # top-3: per row through numpy
        ((2, 10, 1, 1), np.float32, 1),  # a 4-D head: each row flattened, as top_k does
        ((2, 100), np.float32, 1),  # above the plain-Python limit
    ],
)
def test_top_k_rows_is_top_k_of_each_row(shape: tuple[int, ...], dtype: type, k: int) -> None:
    rng = np.random.default_rng(sum(shape) + k)
    output = rng.normal(0.0, 2.0, shape).astype(dtype)
    labels = [f"c{i}" for i in range(7)]
    assert top_k_rows(output, k, labels) == [top_k(output[i], k, labels) for i in range(shape[0])]
