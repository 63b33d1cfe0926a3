"""Synthetic shapes: grey 64x64 frames with 1-3 squares, circles or triangles and their boxes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SHAPE_CLASSES = ("square", "circle", "triangle")
FRAME_SIZE = 64
# Box sides in pixels: big enough to tell a triangle from a disc, small enough for 3 a frame.
SIDE_MIN, SIDE_MAX = 12, 24
# The detector's grid: one cell per 8x8 pixels, an object belongs to the cell of its centre.
CELL = 8


@dataclass(frozen=True)
class ShapesFrame:
    """One frame (uint8 [64, 64]) with its objects: boxes [K, 4] xyxy pixels, class ids [K]."""

    pixels: npt.NDArray[np.uint8]
    boxes: npt.NDArray[np.float32]
    classes: npt.NDArray[np.int64]


def _mask(kind: int, side: int) -> npt.NDArray[np.bool_]:
    """A filled shape of ``side`` x ``side`` pixels, sampled at pixel centres."""
    c = (np.arange(side) + 0.5) / side  # 0..1 across the box
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if kind == 0:
        return np.ones((side, side), dtype=bool)
    if kind == 1:
        return bool_array((xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25)
    # an upright triangle: apex at the top centre, base along the bottom edge
    return bool_array(np.abs(xx - 0.5) <= yy / 2)


def bool_array(a: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = np.asarray(a, dtype=bool)
    return out


def shapes_frame(rng: np.random.Generator, size: int = FRAME_SIZE) -> ShapesFrame:
    """Draw one frame: a noisy background and 1-3 shapes whose boxes do not touch and whose
    centres fall in different grid cells (so each cell has at most one object)."""
    background = float(rng.uniform(10, 90))
    img = rng.normal(background, 8.0, (size, size))
    boxes: list[list[float]] = []
    classes: list[int] = []
    cells: set[tuple[int, int]] = set()
    want = int(rng.integers(1, 4))
    for _ in range(60):  # rejection sampling; 60 tries always place at least one shape
        if len(boxes) == want:
            break
        side = int(rng.integers(SIDE_MIN, SIDE_MAX + 1))
        x1 = int(rng.integers(0, size - side + 1))
        y1 = int(rng.integers(0, size - side + 1))
        x2, y2 = x1 + side, y1 + side
        cell = (int((y1 + side / 2) // CELL), int((x1 + side / 2) // CELL))
        if cell in cells:
            continue
        if any(x1 < b[2] + 2 and b[0] < x2 + 2 and y1 < b[3] + 2 and b[1] < y2 + 2 for b in boxes):
            continue
        kind = int(rng.integers(0, len(SHAPE_CLASSES)))
        level = float(rng.uniform(140, 250))
        patch = img[y1:y2, x1:x2]
        patch[_mask(kind, side)] = rng.normal(level, 6.0, int(_mask(kind, side).sum()))
        boxes.append([float(x1), float(y1), float(x2), float(y2)])
        classes.append(kind)
        cells.add(cell)
    pixels = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return ShapesFrame(
        pixels,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(classes, dtype=np.int64),
    )


def shapes_frames(count: int, seed: int, size: int = FRAME_SIZE) -> list[ShapesFrame]:
    """``count`` frames from one seed (the same seed gives the same frames)."""
    rng = np.random.default_rng(seed)
    return [shapes_frame(rng, size) for _ in range(count)]
