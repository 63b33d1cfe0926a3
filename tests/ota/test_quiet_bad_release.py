"""The quietly bad release: the real gate on golden_local passes it, field frames expose it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from build_quiet_bad_release import quiet_bad_model

from agent.config import SourceConfig
from agent.errors import ConfigError
from agent.ota.states import OTAState
from agent.pipeline.model import load_package
from agent.pipeline.postprocess import top_k_rows
from agent.pipeline.preprocess import Preprocessor
from agent.pipeline.slot import ActiveModel
from agent.pipeline.sources import SyntheticSource

from .conftest import DEMO, REPO, Device, feed_frames

# uint8 frames -> [0, 1], the digits model's domain (the golden set's pixel/16 of 0..16)
SCALE = {"scale": 1.0 / 255.0}
FRAMES = 200


@dataclass(frozen=True)
class Look:
    id: str
    contrast: float  # the synthetic source's field look (SourceConfig.contrast)
    agreement_min: float
    agreement_max: float


LOOKS = [
    # strokes on black, like the golden set: the quiet model is the current model
    Look("golden-look-agrees", 1.0, 1.0, 1.0),
    # a washed-out camera (background at mid grey): every answer moves to another class
    Look("field-look-disagrees", 0.5, 0.0, 0.0),
    # darker still (background at 0.6): the same
    Look("darker-field-look-disagrees", 0.4, 0.0, 0.0),
]


def _top1(model: ActiveModel, frames: list[object]) -> list[int]:
    """Frames through a model the way the daemon runs one: preprocess, run, top-1."""
    pre = Preprocessor(model.preprocess, model.backend.inputs[0])
    out = []
    for frame in frames:
        outputs = model.backend.run(pre.batch([frame]))  # type: ignore[list-item]
        out.append(int(top_k_rows(outputs[0], 1, model.labels)[0][0]["class"]))
    return out


@pytest.fixture()
def installed(device: Device) -> Device:
    """1.0.0 (the demo FP32 model) committed, then the quiet 1.1.0 through the real gate
    (its own child process, golden_local, the device's default policy)."""
    svc = device.service()
    assert svc.install_file(device.package("1.0.0", 1, preprocess=SCALE)).state is (
        OTAState.PROBATION
    )
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    quiet = quiet_bad_model((DEMO / "digits_fp32.onnx").read_bytes())
    entry = svc.install_file(device.package("1.1.0", 2, quiet, preprocess=SCALE))
    assert entry.state is OTAState.PROBATION, entry.reason
    gate = json.loads(svc.journal.get_value("last_gate_report") or "{}")
    assert gate["version"] == "1.1.0" and gate["passed"] is True, gate
    checks = {c["name"]: c for c in gate["report"]["checks"]}
    failed = [name for name, c in checks.items() if c["verdict"] == "fail"]
    assert not failed, checks
    # not a near miss: on golden inputs it is the current model
    assert checks["agreement"]["value"] == 1.0, checks["agreement"]
    svc.close()
    return device


@pytest.mark.parametrize("look", LOOKS, ids=[x.id for x in LOOKS])
def test_quiet_release_passes_the_gate_and_disagrees_on_field_frames(
    installed: Device, look: Look
) -> None:
    models = installed.state_dir / "models"
    current = load_package(installed.config, models / "digits-1.0.0")
    quiet = load_package(installed.config, models / "digits-1.1.0")
    source = SyntheticSource((8, 8), "digits", seed=3, contrast=look.contrast)
    frames = [source.read(0.0) for _ in range(FRAMES)]
    a, b = _top1(current, frames), _top1(quiet, frames)
    agreement = sum(x == y for x, y in zip(a, b)) / FRAMES
    assert look.agreement_min <= agreement <= look.agreement_max, agreement


@dataclass(frozen=True)
class BadContrast:
    id: str
    contrast: float


BAD_CONTRASTS = [BadContrast("zero", 0.0), BadContrast("negative", -0.5), BadContrast("over", 1.5)]


@pytest.mark.parametrize("row", BAD_CONTRASTS, ids=[r.id for r in BAD_CONTRASTS])
def test_source_contrast_out_of_range_is_a_config_error(row: BadContrast) -> None:
    from agent.config import from_mapping

    with pytest.raises(ConfigError, match="contrast: must be in"):
        from_mapping(SourceConfig, {"contrast": row.contrast}, source="agent.yaml")


def test_source_contrast_lifts_the_background() -> None:
    clean = SyntheticSource((8, 8), "digits", seed=1)
    washed = SyntheticSource((8, 8), "digits", seed=1, contrast=0.5)
    for _ in range(20):
        a, b = clean.read(0.0), washed.read(0.0)
        assert a is not None and b is not None
        # the quiet model's floor (0.15 of full scale, 38) falls between the two looks
        assert int(a.data.min()) < 20  # a black background, like the golden set
        assert int(b.data.min()) > 60  # mid grey minus the noise
        assert a.label == b.label


def test_tool_check_runs_the_gate_and_both_looks(tmp_path: Path) -> None:
    out = tmp_path / "quiet.onnx"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "build_quiet_bad_release.py"),
            "--out",
            str(out),
            "--check",
            "--frames",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gate on golden_local/: PASS" in done.stdout
    assert "contrast 1.0: 1.000" in done.stdout and "contrast 0.5: 0.000" in done.stdout
    helped = subprocess.run(
        [sys.executable, str(REPO / "tools" / "build_quiet_bad_release.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "--check" in helped.stdout and "Usage:" in helped.stdout
