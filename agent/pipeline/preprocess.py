"""Turns frames into model input batches from the model's schema: resize, colour, scale, layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import PreprocessConfig, from_mapping
from agent.errors import InputDataError
from agent.pipeline.sources import Frame
from agent.runtime.base import TensorSpec

# ITU-R BT.601 luma weights, as OpenCV's RGB2GRAY uses
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def preprocess_from_manifest(data: Mapping[str, Any] | None, where: str) -> PreprocessConfig:
    """The ``preprocess`` block of a package manifest as a PreprocessConfig."""
    if not data:
        return PreprocessConfig()
    plain = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in data.items()}
    known = {"resize", "layout", "color_order", "mean", "std", "scale", "task", "top_k"}
    known |= {"score_threshold", "iou_threshold", "detection_layout", "max_detections"}
    known |= {"box_units"}
    plain = {k: v for k, v in plain.items() if k in known}
    return from_mapping(PreprocessConfig, plain, source=f"{where}:preprocess")


def resize_nearest(img: npt.NDArray[Any], height: int, width: int) -> npt.NDArray[Any]:
    """Resize without OpenCV: area mean for whole-number shrink factors, else nearest pixel."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    if h % height == 0 and w % width == 0:
        fh, fw = h // height, w // width
        shaped = img.reshape(height, fh, width, fw, *img.shape[2:]).astype(np.float32)
        out: npt.NDArray[Any] = shaped.mean(axis=(1, 3))
        return out
    rows = (np.arange(height) * h // height).clip(0, h - 1)
    cols = (np.arange(width) * w // width).clip(0, w - 1)
    picked: npt.NDArray[Any] = img[np.ix_(rows, cols)]
    return picked


def _resize(img: npt.NDArray[Any], height: int, width: int) -> npt.NDArray[Any]:
    if img.shape[:2] == (height, width):
        return img
    try:
        import cv2
    except ImportError:
        return resize_nearest(img, height, width)
    out: npt.NDArray[Any] = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    if img.ndim == 3 and out.ndim == 2:
        out = out[:, :, None]
    return out


class Preprocessor:
    """Builds one batch from frames for one model input; frames arrive as HxW or HxWxC RGB."""

    def __init__(self, config: PreprocessConfig, spec: TensorSpec) -> None:
        self.config = config
        self.spec = spec
        dims = [d for d in spec.shape[1:]]
        self._row_shape: tuple[int | None, ...] = tuple(dims)
        # the row shape to compare with in one step when every dimension is known
        self._exact_shape = None if None in dims else tuple(dims)
        channels = 3 if config.color_order in ("RGB", "BGR") else 1
        if config.layout == "NCHW" and len(dims) == 3 and dims[0] is not None:
            channels = dims[0]
        elif config.layout == "NHWC" and len(dims) == 3 and dims[2] is not None:
            channels = dims[2]
        self.channels = int(channels)
        size: Sequence[int] = config.resize
        if not size and len(dims) == 3:
            hw = dims[1:] if config.layout == "NCHW" else dims[:2]
            if hw[0] is not None and hw[1] is not None:
                size = (int(hw[0]), int(hw[1]))
        self.size: tuple[int, int] | None = (int(size[0]), int(size[1])) if size else None
        n = self.channels
        self._mean = np.asarray(config.mean or [0.0], dtype=np.float32)
        self._std = np.asarray(config.std or [1.0], dtype=np.float32)
        for name, arr in (("mean", self._mean), ("std", self._std)):
            if arr.size not in (1, n):
                raise InputDataError(f"preprocess.{name}: has {arr.size} values for {n} channels")
        self._scale = np.float32(config.scale)
        self._identity = (
            np.all(self._mean == 0.0) and np.all(self._std == 1.0) and self._scale == 1.0
        )

    def frame_to_row(self, frame: Frame) -> npt.NDArray[np.float32]:
        """One frame as one model input row (no batch dimension), float32."""
        data = frame.data
        if frame.ready:
            row = np.asarray(data, dtype=np.float32)
            self._check_row(row, frame)
            return row
        img = np.asarray(data)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if self.size is not None:
            img = _resize(img, self.size[0], self.size[1])
        img = self._to_colour(img, frame)
        x = img.astype(np.float32, copy=False)
        if not self._identity:
            x = (x * self._scale - self._mean) / self._std
        if self.config.layout == "NCHW":
            x = np.transpose(x, (2, 0, 1))
        elif self.config.layout == "flat":
            x = x.reshape(-1)
        row = np.ascontiguousarray(x, dtype=np.float32)
        self._check_row(row, frame)
        return row

    def _to_colour(self, img: npt.NDArray[Any], frame: Frame) -> npt.NDArray[Any]:
        """HxWxC in the model's colour order and channel count."""
        order = self.config.color_order
        if img.ndim == 2:
            img = img[:, :, None]
        c = img.shape[2]
        if self.channels == 1:
            if c >= 3:
                gray = img[:, :, :3].astype(np.float32) @ _LUMA
                return gray[:, :, None]
            return img[:, :, :1]
        if c == 1:
            return np.repeat(img, self.channels, axis=2)
        if c >= 3 and order == "BGR":
            return img[:, :, 2::-1]
        if c != self.channels:
            raise InputDataError(
                f"{frame.source}: frame has {c} channels, the model wants {self.channels}"
            )
        return img

    def _check_row(self, row: npt.NDArray[np.float32], frame: Frame) -> None:
        if row.shape == self._exact_shape:
            return
        want = self._row_shape
        if row.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, row.shape)):
            shown = tuple("N" if d is None else d for d in want)
            raise InputDataError(
                f"{frame.source}: frame becomes shape {row.shape}, the model wants {shown} "
                "(check preprocess.resize/layout/color_order)"
            )

    def batch(self, frames: Sequence[Frame]) -> npt.NDArray[np.float32]:
        """A batch for the model from one or more frames."""
        if len(frames) == 1:
            return self.frame_to_row(frames[0])[None]
        return np.stack([self.frame_to_row(f) for f in frames])
