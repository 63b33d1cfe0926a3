"""Frame sources: synthetic, a (watched) directory of .npy/images, video files, cameras."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.config import SourceConfig
from agent.errors import ConfigError, InputDataError, SourceError
from agent.telemetry.ratelimit import warn_every
from agent.textio import load_npy

log = logging.getLogger(__name__)

NPY_SUFFIXES = (".npy",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
# how many distinct synthetic frames are made up front; the source cycles through them so
# a frame costs nothing at run time
SYNTHETIC_POOL = 64
MAX_FRAME_BYTES = 64 << 20
# a frame file's sidecar metadata (frame_0001.npy + frame_0001.json): a small JSON object
SIDECAR_SUFFIX = ".json"
MAX_SIDECAR_BYTES = 64 << 10
# a source repeats the same warning (bad files, a dead camera) at most once per this long
WARN_EVERY_S = 30.0


@dataclass
class Frame:
    """One input frame: pixels (HxW gray or HxWxC RGB) or, when ``ready``, a model input row."""

    seq: int
    data: npt.NDArray[Any]
    source: str
    captured_s: float = field(default_factory=time.time)
    ready: bool = False
    label: int | None = None
    # what the source knows about the frame besides its pixels (a directory source's
    # sidecar JSON); sampled telemetry records carry it, masked by telemetry.pii_fields
    meta: dict[str, Any] | None = None


class Source(Protocol):
    """What the frame loop needs from a source."""

    name: str

    def read(self, timeout_s: float) -> Frame | None:
        """Return the next frame, or None when none came within ``timeout_s``."""

    @property
    def exhausted(self) -> bool:
        """True once the source has no more frames and never will."""

    def state(self) -> str:
        """A short word for status: "ok", "waiting", "reconnecting", "finished"."""

    def close(self) -> None: ...


class SkipCounter:
    """Frames a source could not deliver (unreadable file, failed grab) and the last reason.

    Sources keep one as ``skips``; the daemon shows it in status as frames_skipped.
    """

    def __init__(self, source_name: str) -> None:
        self.source_name = source_name
        self.count = 0
        self.last_reason: str | None = None
        self.last_s = 0.0  # monotonic time of the last skip

    def skip(self, reason: str, warn: bool = True) -> None:
        self.count += 1
        self.last_reason = reason
        self.last_s = time.monotonic()
        if not warn:
            return
        warn_every(
            log,
            f"skip:{self.source_name}",
            WARN_EVERY_S,
            "source %s: skipped a frame: %s (%d skipped so far)",
            self.source_name,
            reason,
            self.count,
        )


# --------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------

# 8x8 strokes of the ten digits in the thick style of scikit-learn's digits (the digits
# demo model reads 9 of the 10 clean glyphs right; the 8 passes for a 0)
_GLYPHS = (
    (
        "..####..",
        ".##..##.",
        ".##..##.",
        ".##..##.",
        ".##..##.",
        ".##..##.",
        ".##..##.",
        "..####..",
    ),
    (
        "...##...",
        "..###...",
        ".####...",
        "...##...",
        "...##...",
        "...##...",
        "...##...",
        ".######.",
    ),
    (
        "..####..",
        ".##..##.",
        ".....##.",
        "....##..",
        "...##...",
        "..##....",
        ".##.....",
        ".######.",
    ),
    (
        "..####..",
        ".##..##.",
        ".....##.",
        "...###..",
        ".....##.",
        ".....##.",
        ".##..##.",
        "..####..",
    ),
    (
        "....##..",
        "...###..",
        "..####..",
        ".##.##..",
        "##..##..",
        "#######.",
        "....##..",
        "....##..",
    ),
    (
        ".######.",
        ".##.....",
        ".##.....",
        ".#####..",
        ".....##.",
        ".....##.",
        ".##..##.",
        "..####..",
    ),
    (
        "..####..",
        ".##.....",
        ".##.....",
        ".#####..",
        ".##..##.",
        ".##..##.",
        ".##..##.",
        "..####..",
    ),
    (
        ".######.",
        ".....##.",
        "....##..",
        "...##...",
        "...##...",
        "..##....",
        "..##....",
        "..##....",
    ),
    (
        "..####..",
        ".##..##.",
        ".##..##.",
        "..####..",
        ".##..##.",
        ".##..##.",
        ".##..##.",
        "..####..",
    ),
    (
        "..####..",
        ".##..##.",
        ".##..##.",
        "..#####.",
        ".....##.",
        ".....##.",
        "....##..",
        "..###...",
    ),
)
_BLUR = np.array([0.2, 0.6, 0.2], dtype=np.float32)


def digit_glyph(digit: int, height: int = 8, width: int = 8) -> npt.NDArray[np.float32]:
    """A digit's strokes as a float image in [0, 1] of the given size (softened, nearest)."""
    rows8 = _GLYPHS[digit % 10]
    canvas = np.array([[1.0 if c == "#" else 0.0 for c in row] for row in rows8], np.float32)
    # a light blur, like the 4x4-block counts that make scikit-learn's 8x8 digits
    canvas = np.apply_along_axis(lambda v: np.convolve(v, _BLUR, mode="same"), 0, canvas)
    canvas = np.apply_along_axis(lambda v: np.convolve(v, _BLUR, mode="same"), 1, canvas)
    canvas /= canvas.max()
    rows = (np.arange(height) * 8 // max(height, 1)).clip(0, 7)
    cols = (np.arange(width) * 8 // max(width, 1)).clip(0, 7)
    out: npt.NDArray[np.float32] = canvas[np.ix_(rows, cols)].astype(np.float32)
    return out


class SyntheticSource:
    """Deterministic frames for demos, tests and benchmarks (no camera, no files)."""

    def __init__(
        self,
        shape: Sequence[int],
        pattern: str = "digits",
        seed: int = 0,
        max_frames: int = 0,
        pool: int = SYNTHETIC_POOL,
        contrast: float = 1.0,
    ) -> None:
        self.name = f"synthetic:{pattern}"
        self.skips = SkipCounter(self.name)
        self.shape = tuple(int(d) for d in shape)
        self.pattern = pattern
        self.max_frames = max_frames
        self._seq = 0
        rng = np.random.default_rng(seed)
        self._labels: list[int | None] = []
        self._frames: list[npt.NDArray[Any]] = []
        for i in range(pool):
            if pattern == "tensor":
                self._frames.append(rng.random(self.shape, dtype=np.float32))
                self._labels.append(None)
            elif pattern == "random":
                self._frames.append(rng.integers(0, 256, self.shape, dtype=np.uint8))
                self._labels.append(None)
            elif pattern == "shapes":
                # grey squares, circles and triangles (the demo detector's data set)
                from agent.demo.shapes import shapes_frame

                pixels = shapes_frame(rng, self.shape[0]).pixels
                if len(self.shape) == 3:
                    pixels = np.repeat(pixels[:, :, None], self.shape[2], axis=2)
                self._frames.append(pixels)
                self._labels.append(None)
            else:
                digit = i % 10
                h, w = self.shape[0], self.shape[1]
                img = digit_glyph(digit, h, w)
                if contrast != 1.0:
                    # the background lifted towards the ink (SourceConfig.contrast)
                    img = (1.0 - contrast) + contrast * img
                img = np.clip(img + rng.normal(0.0, 0.08, img.shape), 0.0, 1.0)
                pixels = (img * 255).astype(np.uint8)
                if len(self.shape) == 3:
                    pixels = np.repeat(pixels[:, :, None], self.shape[2], axis=2)
                self._frames.append(pixels)
                self._labels.append(digit)

    def read(self, timeout_s: float) -> Frame | None:
        if self.exhausted:
            return None
        i = self._seq % len(self._frames)
        self._seq += 1
        return Frame(
            seq=self._seq,
            data=self._frames[i],
            source=self.name,
            ready=self.pattern == "tensor",
            label=self._labels[i],
        )

    @property
    def exhausted(self) -> bool:
        return self.max_frames > 0 and self._seq >= self.max_frames

    def state(self) -> str:
        return "finished" if self.exhausted else "ok"

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# directory of .npy files and images
# --------------------------------------------------------------------------------------


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def read_image_file(path: Path) -> npt.NDArray[Any]:
    """Read an .npy array (no pickles) or an image (OpenCV, RGB order) as a frame."""
    if path.suffix.lower() in NPY_SUFFIXES:
        arr = load_npy(path, max_bytes=MAX_FRAME_BYTES)
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise InputDataError(f"{path}: a frame must be HxW or HxWxC, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise InputDataError(f"{path}: a frame must be numeric, got dtype {arr.dtype}")
        return arr
    cv2 = _import_cv2()
    if cv2 is None:
        raise SourceError(
            f"{path}: reading images needs OpenCV (pip install 'edge-agent[camera]'); "
            ".npy frames work without it"
        )
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputDataError(f"{path}: not an image OpenCV can read")
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    out: npt.NDArray[Any] = img
    return out


def read_sidecar(frame_path: Path) -> dict[str, Any] | None:
    """The frame's sidecar metadata (``<stem>.json`` beside it), None when there is none.

    A sidecar that is too big, not JSON or not an object is left out with a warning: the
    frame itself is still good.
    """
    import json

    path = frame_path.with_suffix(SIDECAR_SUFFIX)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_SIDECAR_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = f"cannot read ({exc.strerror})"
    else:
        why = f"over {MAX_SIDECAR_BYTES} bytes"
        if len(raw) <= MAX_SIDECAR_BYTES:
            try:
                data = json.loads(raw)
            except ValueError as exc:
                data, why = None, f"not JSON ({exc})"
            if isinstance(data, dict):
                return data
            if data is not None:
                why = "not a JSON object"
    warn_every(
        log, f"sidecar:{path.parent}", WARN_EVERY_S, "source: %s: sidecar left out: %s", path, why
    )
    return None


class DirectorySource:
    """Frames from the .npy and image files of a folder, in name order.

    Watch mode keeps polling for new files (by name, so a file replaced under the same
    name is not read twice); loop mode starts over at the end. A file that cannot be read
    is skipped with a warning: one bad frame must not stop the agent. A frame file may
    have a sidecar ``<stem>.json`` object: the frame's metadata (``Frame.meta``).
    """

    def __init__(
        self,
        path: Path,
        watch: bool = False,
        loop: bool = False,
        poll_interval_s: float = 0.5,
        max_frames: int = 0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not path.is_dir():
            raise SourceError(f"{path}: source directory not found")
        self.name = f"directory:{path}"
        self.skips = SkipCounter(self.name)
        self.path = path
        self.watch = watch
        self.loop = loop
        self.poll_interval_s = poll_interval_s
        self.max_frames = max_frames
        self._sleep = sleep
        self._clock = clock
        self._seen: set[str] = set()
        self._queue: list[Path] = []
        self._seq = 0
        self._done = False
        self._scan()
        if not self._queue and not watch:
            raise SourceError(f"{path}: no .npy or image files in the source directory")

    def _scan(self) -> None:
        suffixes = NPY_SUFFIXES + IMAGE_SUFFIXES
        try:
            names = sorted(os.listdir(self.path))
        except OSError as exc:
            warn_every(
                log,
                f"list:{self.path}",
                WARN_EVERY_S,
                "source %s: cannot list (%s)",
                self.path,
                exc.strerror,
            )
            return
        for name in names:
            # dotfiles are partial writes in progress (write_atomic's temp names)
            if name in self._seen or name.startswith("."):
                continue
            p = self.path / name
            if p.suffix.lower() in suffixes and p.is_file():
                self._seen.add(name)
                self._queue.append(p)

    def read(self, timeout_s: float) -> Frame | None:
        deadline = self._clock() + max(0.0, timeout_s)
        while True:
            if self.exhausted:
                return None
            if self._queue:
                p = self._queue.pop(0)
                try:
                    data = read_image_file(p)
                except (InputDataError, SourceError) as exc:
                    self.skips.skip(str(exc))
                    continue
                self._seq += 1
                return Frame(seq=self._seq, data=data, source=str(p), meta=read_sidecar(p))
            if self.loop and self._seen:
                self._seen.clear()
            elif not self.watch:
                self._done = True
                return None
            self._scan()
            if self._queue:
                continue
            left = deadline - self._clock()
            if left <= 0:
                return None
            self._sleep(min(self.poll_interval_s, left))

    @property
    def exhausted(self) -> bool:
        return self._done or (self.max_frames > 0 and self._seq >= self.max_frames)

    def state(self) -> str:
        if self.exhausted:
            return "finished"
        return "ok" if self._queue else "waiting"

    @property
    def skipped(self) -> int:
        return self.skips.count

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# video files and cameras (OpenCV)
# --------------------------------------------------------------------------------------


class VideoSource:
    """A video file or a camera through OpenCV; a lost camera is reopened with backoff.

    read() never blocks longer than one frame grab: while waiting to retry it returns
    None, so the daemon stays responsive to SIGTERM and keeps feeding the watchdog.
    """

    def __init__(
        self,
        target: Path | int,
        loop: bool = False,
        backoff_max_s: float = 30.0,
        max_frames: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._cv2 = _import_cv2()
        if self._cv2 is None:
            raise SourceError(
                "video and camera sources need OpenCV (pip install 'edge-agent[camera]')"
            )
        self.is_camera = isinstance(target, int)
        if isinstance(target, Path) and not target.is_file():
            raise SourceError(f"{target}: video file not found")
        self.target = target
        self.name = f"camera:{target}" if self.is_camera else f"video:{target}"
        self.skips = SkipCounter(self.name)
        self.loop = loop
        self.backoff_max_s = backoff_max_s
        self.max_frames = max_frames
        self._clock = clock
        self._sleep = sleep
        self._cap: Any = None
        self._seq = 0
        self._done = False
        self._backoff_s = 0.5
        self._retry_at = 0.0
        self.reconnects = 0
        self._state = "ok"
        if not self._open():
            raise SourceError(f"{self.name}: cannot open")

    def _open(self) -> bool:
        cv2 = self._cv2
        target = self.target if self.is_camera else str(self.target)
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            return False
        self._cap = cap
        return True

    def _lost(self, why: str) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._retry_at = self._clock() + self._backoff_s
        self.skips.skip(why, warn=False)  # warned below, with the retry delay
        warn_every(
            log,
            f"lost:{self.name}",
            WARN_EVERY_S,
            "%s: %s; retrying in %.1f s",
            self.name,
            why,
            self._backoff_s,
        )
        self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)
        self._state = "reconnecting"

    def read(self, timeout_s: float) -> Frame | None:
        if self.exhausted:
            return None
        if self._cap is None:
            wait_s = self._retry_at - self._clock()
            if wait_s > 0:
                self._sleep(min(wait_s, max(0.0, timeout_s)))
                if self._retry_at > self._clock():
                    return None
            self.reconnects += 1
            if not self._open():
                self._lost("still cannot open")
                return None
            log.info("%s: reopened", self.name)
        ok, img = self._cap.read()
        if not ok or img is None:
            if not self.is_camera:
                if self.loop and self._seq > 0:
                    self._cap.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, img = self._cap.read()
                if not ok or img is None:
                    if not self.loop:
                        self._done = True
                        return None
                    self._lost("cannot read")
                    return None
            else:
                self._lost("frame grab failed (camera gone?)")
                return None
        self._backoff_s = 0.5
        self._state = "ok"
        if img.ndim == 3 and img.shape[2] == 3:
            img = self._cv2.cvtColor(img, self._cv2.COLOR_BGR2RGB)
        self._seq += 1
        return Frame(seq=self._seq, data=img, source=self.name)

    @property
    def exhausted(self) -> bool:
        return self._done or (self.max_frames > 0 and self._seq >= self.max_frames)

    def state(self) -> str:
        return "finished" if self.exhausted else self._state

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def synthetic_shape(
    config: SourceConfig, input_shape: Sequence[int | None], layout: str
) -> tuple[int, ...]:
    """The frame shape a synthetic source makes: from the config, else from the model input."""
    dims = [d if d is not None else 1 for d in input_shape[1:]]
    if config.pattern == "tensor":
        return tuple(dims)
    if layout == "NHWC" and len(dims) == 3:
        h, w, c = dims
    elif len(dims) == 3:
        c, h, w = dims
    elif len(dims) == 2:
        h, w, c = dims[0], dims[1], 1
    else:
        h, w, c = 8, 8, 1
    h = config.height or h
    w = config.width or w
    c = config.channels or c
    return (h, w) if c == 1 else (h, w, c)


def open_source(
    config: SourceConfig, input_shape: Sequence[int | None] = (None, 1, 8, 8), layout: str = "NCHW"
) -> Source:
    """Build the configured source; errors name the source and say what is wrong."""
    if config.kind == "synthetic":
        shape = synthetic_shape(config, input_shape, layout)
        return SyntheticSource(
            shape, config.pattern, config.seed, config.max_frames, contrast=config.contrast
        )
    if config.kind == "directory":
        if config.path is None:
            raise ConfigError("source.path: required for a directory source")
        return DirectorySource(
            config.path, config.watch, config.loop, config.poll_interval_s, config.max_frames
        )
    if config.kind == "video":
        if config.path is None:
            raise ConfigError("source.path: required for a video source")
        return VideoSource(config.path, config.loop, config.reopen_backoff_max_s, config.max_frames)
    return VideoSource(config.device, False, config.reopen_backoff_max_s, config.max_frames)
