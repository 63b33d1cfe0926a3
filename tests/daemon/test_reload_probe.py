"""SIGHUP/reload runs one probe frame through the new preprocessing and model first: a config
whose preprocessing does not fit the model is refused and the running config kept."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .test_daemon import start, stop


@dataclasses.dataclass(frozen=True)
class ReloadRow:
    """What the operator's edited config controls: its preprocess section."""

    id: str
    preprocess: dict[str, Any]
    refused: str | None  # the error named, or None: the reload applies


ROWS = [
    ReloadRow(
        "mean-for-three-channels",
        {"mean": [0.5, 0.5, 0.5], "std": [1.0, 1.0, 1.0]},
        "preprocess.mean: has 3 values for 1 channels",
    ),
    ReloadRow("NHWC-for-an-NCHW-model", {"layout": "NHWC"}, "the model wants (1, 8, 8)"),
    ReloadRow("a-scale-that-fits", {"scale": 1 / 128}, None),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_sighup_with_a_preprocessing_that_does_not_fit_is_refused(
    make_config: Callable[..., Path], helpers: Any, row: ReloadRow
) -> None:
    cfg = make_config()
    daemon, thread, _ = start(cfg)
    try:
        helpers.wait_for(lambda: daemon.stats.frames > 3, what="frames")
        before = daemon.config.preprocess
        make_config(preprocess=row.preprocess)  # rewrites the same file
        daemon._on_signal(signal.SIGHUP, None)  # what the SIGHUP handler does
        helpers.wait_for(lambda: daemon.last_reload is not None, what="the reload")
        reload = daemon.last_reload
        assert reload is not None
        frames = daemon.stats.frames
        helpers.wait_for(lambda: daemon.stats.frames > frames + 5, what="frames after it")
        if row.refused is None:
            assert reload["ok"] is True and "model" in reload["changed"], reload
            assert daemon.config.preprocess != before
        else:
            assert reload["ok"] is False, reload
            assert "probe frame" in reload["error"] and row.refused in reload["error"]
            assert daemon.config.preprocess == before  # the running config is kept
            assert daemon.status_snapshot()["last_reload"]["ok"] is False
        assert daemon.stats.errors == 0  # no frame ever ran on a config that cannot fit
    finally:
        stop(daemon, thread)
