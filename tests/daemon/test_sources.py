"""Every source on real files: synthetic, .npy and image directories (watch mode), video files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import SourceConfig
from agent.errors import ConfigError, SourceError
from agent.pipeline.sources import DirectorySource, SyntheticSource, VideoSource, open_source


def test_synthetic_is_deterministic_and_labelled() -> None:
    a = SyntheticSource((8, 8), "digits", seed=3)
    b = SyntheticSource((8, 8), "digits", seed=3)
    fa, fb = a.read(0), b.read(0)
    assert fa is not None and fb is not None
    assert np.array_equal(fa.data, fb.data) and fa.data.dtype == np.uint8
    assert fa.label == 0 and fa.data.shape == (8, 8)
    c = SyntheticSource((8, 8), "digits", seed=4).read(0)
    assert c is not None and not np.array_equal(fa.data, c.data)


def test_synthetic_tensor_frames_are_ready_inputs_and_max_frames_ends() -> None:
    src = SyntheticSource((3, 16, 16), "tensor", max_frames=3)
    frames = [src.read(0) for _ in range(4)]
    assert frames[3] is None and src.exhausted and src.state() == "finished"
    assert all(f is not None and f.ready and f.data.dtype == np.float32 for f in frames[:3])


def test_open_source_takes_the_synthetic_shape_from_the_model() -> None:
    src = open_source(SourceConfig(kind="synthetic"), (None, 3, 32, 24), "NCHW")
    frame = src.read(0)
    assert frame is not None and frame.data.shape == (32, 24, 3)
    src = open_source(SourceConfig(kind="synthetic", width=40, height=30), (None, 1, 8, 8))
    frame = src.read(0)
    assert frame is not None and frame.data.shape == (30, 40)


def test_directory_of_npy_in_name_order_skipping_bad_files(tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"f{i}.npy", np.full((8, 8), i, np.uint8))
    (tmp_path / "f1b.npy").write_bytes(b"not an npy")
    np.save(tmp_path / "f2b.npy", np.zeros(5))  # 1-D: not a frame
    (tmp_path / "notes.txt").write_text("ignored")
    src = DirectorySource(tmp_path)
    seen = []
    while (frame := src.read(0.0)) is not None:
        seen.append(int(frame.data[0, 0]))
    assert seen == [0, 1, 2]
    assert src.skipped == 2 and src.exhausted


def test_directory_watch_picks_up_new_files(tmp_path: Path) -> None:
    src = DirectorySource(tmp_path, watch=True, poll_interval_s=0.01)
    assert src.read(0.05) is None and not src.exhausted and src.state() == "waiting"
    np.save(tmp_path / ".partial.npy", np.zeros((4, 4)))  # a write in progress: ignored
    np.save(tmp_path / "new.npy", np.ones((4, 4), np.uint8))
    frame = src.read(1.0)
    assert frame is not None and frame.source.endswith("new.npy")
    assert src.read(0.05) is None  # not read twice


def test_directory_loop_starts_over(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    np.save(tmp_path / "b.npy", np.ones((2, 2)))
    src = DirectorySource(tmp_path, loop=True, max_frames=5)
    names = [Path(f.source).name for f in iter(lambda: src.read(0), None)]
    assert names == ["a.npy", "b.npy", "a.npy", "b.npy", "a.npy"]


def test_directory_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        DirectorySource(tmp_path / "missing")
    with pytest.raises(SourceError, match=r"no .npy or image files"):
        DirectorySource(tmp_path)
    with pytest.raises(ConfigError, match="path: required"):
        from agent.config import from_mapping

        from_mapping(SourceConfig, {"kind": "directory"})


def test_directory_of_images_needs_opencv(tmp_path: Path, helpers: Any) -> None:
    if not helpers.has_cv2():
        pytest.skip("OpenCV (extra 'camera') not installed")
    import cv2

    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :, 2] = 255  # red in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "red.png"), img)
    frame = DirectorySource(tmp_path).read(0)
    assert frame is not None and frame.data.shape == (20, 30, 3)
    assert frame.data[0, 0].tolist() == [255, 0, 0]  # delivered as RGB


def make_video(path: Path, frames: int) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((24, 32, 3), i * 20, np.uint8))
    writer.release()
    return path


def test_video_file_plays_to_the_end_and_loops(tmp_path: Path, helpers: Any) -> None:
    if not helpers.has_cv2():
        pytest.skip("OpenCV (extra 'camera') not installed")
    video = make_video(tmp_path / "clip.avi", 5)
    src = VideoSource(video)
    frames = list(iter(lambda: src.read(0.1), None))
    assert len(frames) == 5 and frames[0].data.shape == (24, 32, 3) and src.exhausted
    src.close()
    looped = VideoSource(video, loop=True, max_frames=12)
    assert len(list(iter(lambda: looped.read(0.1), None))) == 12
    looped.close()


def test_lost_video_is_retried_with_backoff_not_a_crash(tmp_path: Path, helpers: Any) -> None:
    if not helpers.has_cv2():
        pytest.skip("OpenCV (extra 'camera') not installed")
    video = make_video(tmp_path / "clip.avi", 3)
    now = [0.0]
    src = VideoSource(
        video, loop=True, backoff_max_s=2.0, clock=lambda: now[0], sleep=lambda s: None
    )
    assert src.read(0.1) is not None
    # the file disappears and the open capture is lost, like an unplugged camera
    src._cap.release()
    src._cap = None
    video.unlink()
    src._lost("gone")
    assert src.state() == "reconnecting"
    delays = []
    for _ in range(5):
        assert src.read(0.0) is None  # waits out the backoff without blocking
        delays.append(src._retry_at - now[0])
        now[0] = src._retry_at
        assert src.read(0.0) is None  # retried, failed, backed off further
    assert src.reconnects >= 4
    assert max(delays) <= 2.0 and delays == sorted(delays)
    make_video(video, 3)
    now[0] = src._retry_at
    assert src.read(0.0) is not None and src.state() == "ok"


def test_video_missing_file_is_a_clear_error(tmp_path: Path, helpers: Any) -> None:
    if not helpers.has_cv2():
        pytest.skip("OpenCV (extra 'camera') not installed")
    with pytest.raises(SourceError, match="video file not found"):
        VideoSource(tmp_path / "none.avi")


def test_read_timeout_is_bounded(tmp_path: Path) -> None:
    src = DirectorySource(tmp_path, watch=True, poll_interval_s=0.02)
    started = time.monotonic()
    assert src.read(0.1) is None
    assert time.monotonic() - started < 2.0


def test_synthetic_digits_are_read_as_digits_by_the_demo_model(demo_models: Path) -> None:
    model = demo_models / "digits_fp32.onnx"
    if not model.exists():
        pytest.skip("the digits demo model is not built")
    from agent.runtime import load_backend

    backend = load_backend(model)
    src = SyntheticSource((8, 8), "digits", seed=0)
    frames = [src.read(0) for _ in range(64)]
    x = np.stack([f.data for f in frames if f is not None])[:, None].astype(np.float32) / 255
    predicted = backend.run(x)[0].argmax(axis=1)
    labels = np.array([f.label for f in frames if f is not None])
    assert (predicted == labels).mean() >= 0.7
