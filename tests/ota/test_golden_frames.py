"""Raw-frame golden sets: a package's own preprocess -> model -> postprocess; refusals say why."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.errors import GateFailedError, GoldenSetError
from agent.ota.gate_data import golden_set_sha256, load_golden_set
from agent.ota.golden import run_gate
from agent.ota.states import OTAState

from .conftest import DEMO, GOLDEN, Device, _sign, feed_frames, make_device

RAW = GOLDEN / "raw"
SCALE = 1.0 / 255.0  # the shipped frames are uint8: the demo packages' preprocess block


def frame_device(tmp: Path) -> Device:
    """A provisioned device whose golden set is the shipped raw-frame set."""
    dev = make_device(tmp)
    assert dev.config.ota.golden_dir is not None
    golden = dev.config.ota.golden_dir
    shutil.rmtree(golden)
    shutil.copytree(RAW, golden)
    policy = golden / "policy.yaml"
    # latency on 2 busy shared cores is noise; the latency check is tested elsewhere
    policy.write_text(
        policy.read_text().replace("latency_p95_slack_ms: 0.5", "latency_p95_slack_ms: 1000")
    )
    return dev


def package_tar(
    dev: Device,
    version: str,
    counter: int,
    model: bytes,
    preprocess: dict[str, Any] | None = None,
    **manifest_keys: Any,
) -> Path:
    """A signed package tar like tests/ota/conftest.build_package, with any manifest key
    replaced (task, outputs, detection...): what a careless or lying publisher ships."""
    manifest: dict[str, Any] = {
        "format": 1,
        "name": "digits",
        "version": version,
        "release_counter": counter,
        "created": "2026-11-23T12:00:00Z",
        "task": "classification",
        "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "preprocess": {
            "resize": [8, 8],
            "layout": "NCHW",
            "color_order": "GRAY",
            "mean": [0.0],
            "std": [1.0],
            "scale": SCALE,
            **(preprocess or {}),
        },
        "labels": [str(i) for i in range(10)],
        "compat": {"min_agent_version": "0.1.0", "hardware_classes": [], "runtime_features": []},
        "files": [
            {"path": "model.onnx", "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}
        ],
        **manifest_keys,
    }
    raw = json.dumps(manifest, indent=2).encode()
    signers = [k for k in dev.keys if k.role == "release"]
    dev.packages.mkdir(parents=True, exist_ok=True)
    path = dev.packages / f"digits-{version}.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in (
            ("manifest.json", raw),
            ("manifest.sig.json", _sign(raw, signers)),
            ("model.onnx", model),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def digits(name: str = "digits_fp32.onnx") -> bytes:
    return (DEMO / name).read_bytes()


def nan_digits() -> bytes:
    """The demo digits model with a NaN output bias: it loads and runs, every logit NaN."""
    model = onnx.load(str(DEMO / "digits_fp32.onnx"))
    for init in model.graph.initializer:
        if init.name == "b2":
            arr = numpy_helper.to_array(init).copy()
            arr[:] = np.nan
            init.CopyFrom(numpy_helper.from_array(arr, "b2"))
    return model.SerializeToString()


def eleven_outputs() -> bytes:
    """The demo digits MLP with an eleventh output class (its manifest still names ten)."""
    import tempfile

    from demo_models import MLPWeights, mlp_onnx

    weights = MLPWeights.load(DEMO / "digits_mlp_weights.npz")
    with tempfile.TemporaryDirectory() as tmp:
        return mlp_onnx(weights, Path(tmp) / "eleven.onnx", num_outputs=11).read_bytes()


def install_v1(dev: Device) -> None:
    svc = dev.service()
    assert svc.install_file(package_tar(dev, "1.0.0", 1, digits())).state is OTAState.PROBATION
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()


@dataclass(frozen=True)
class PipelineFault:
    """One way a candidate's pipeline does not fit: what the publisher controls (the
    package's preprocess block, its declared task and outputs, the model bytes) and the
    reason the gate must give."""

    id: str
    model: Callable[[], bytes]
    preprocess: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


FAULTS = [
    PipelineFault(
        "wrong input size",
        digits,
        preprocess={"resize": [10, 10]},
        reason="frame becomes shape (1, 10, 10), the model wants (1, 8, 8)",
    ),
    PipelineFault(
        "wrong channels",
        digits,
        preprocess={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        reason="preprocess.mean: has 3 values for 1 channels",
    ),
    PipelineFault(
        "NHWC for an NCHW model",
        digits,
        preprocess={"layout": "NHWC"},
        reason="the model wants (1, 8, 8)",
    ),
    PipelineFault(
        "classifier output on a detection task",
        digits,
        manifest={"task": "detection"},
        reason="declared task detection, but the golden set is classification",
    ),
    PipelineFault(
        "output size differs from the labels",
        eleven_outputs,
        manifest={"outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 11]}]},
        reason="the output has 11 classes, the manifest names 10 labels",
    ),
    PipelineFault(
        "NaN outputs",
        nan_digits,
        reason="480 of 480 golden frames failed: the model outputs NaN or infinite values",
    ),
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.id)
def test_a_candidate_whose_pipeline_does_not_fit_is_rejected_with_the_reason(
    tmp_path: Path, fault: PipelineFault
) -> None:
    dev = frame_device(tmp_path)
    install_v1(dev)
    svc = dev.service()  # the real gate: a child process, as on a device
    tar = package_tar(dev, "1.1.0", 2, fault.model(), fault.preprocess, **fault.manifest)
    with pytest.raises(GateFailedError, match="pipeline"):
        svc.install_file(tar)
    last = svc.journal.last()
    assert last is not None and last.state is OTAState.REJECTED and last.version == "1.1.0"
    assert last.reason.startswith("gate failed: pipeline (")
    assert fault.reason in last.reason
    report = json.loads(svc.journal.get_value("last_gate_report") or "{}")["report"]
    check = report["checks"][0]
    assert report["failed"] == ["pipeline"] and check["verdict"] == "fail"
    assert check["value"] > 0 and fault.reason in check["detail"]
    # nothing moved: the old model is still the current one
    assert svc.current_version() == "1.0.0"
    svc.close()


def test_a_fitting_candidate_passes_and_commits_with_gate_quality(tmp_path: Path) -> None:
    dev = frame_device(tmp_path)
    install_v1(dev)
    svc = dev.service()
    tar = package_tar(dev, "1.1.0", 2, digits("digits_int8.onnx"))
    assert svc.install_file(tar).state is OTAState.PROBATION
    report = json.loads(svc.journal.get_value("last_gate_report") or "{}")["report"]
    assert report["checks"][0]["name"] == "pipeline"
    assert report["checks"][0]["verdict"] == "pass" and report["passed"] is True
    assert report["golden"]["form"] == "frames" and report["golden"]["frame_shape"] == [8, 8]
    # the candidate's golden histograms: the drift baseline, kept with the install
    base = report["metrics"]["drift_baseline"]
    assert base["rows"] == 480 and sum(base["confidence_counts"]) == 480
    assert svc.gate_quality("digits", "1.1.0")["baseline"] == base
    feed_frames(svc, 20)
    committed = svc.journal.last()
    assert committed is not None and committed.state is OTAState.COMMITTED
    margin = committed.detail["quality"]["gate_margin"]
    assert margin == report["margin"]["value"] and margin >= 0
    svc.close()


def test_frames_and_tensors_judge_the_same_rows_alike(tmp_path: Path) -> None:
    golden = tmp_path / "raw"
    shutil.copytree(RAW, golden)
    frames = run_gate(DEMO / "digits_fp32.onnx", DEMO / "digits_int8.onnx", golden).to_dict()
    tensors = run_gate(DEMO / "digits_fp32.onnx", DEMO / "digits_int8.onnx", GOLDEN).to_dict()
    assert frames["failed"] == [] or frames["failed"] == ["latency_p95"]
    assert frames["checks"][0]["name"] == "pipeline"
    assert [c["name"] for c in tensors["checks"]] == [c["name"] for c in frames["checks"][1:]]
    # uint8 frames are the tensors rounded to 1/255: at most a row or two may differ
    for role in ("baseline", "candidate"):
        f, t = frames["metrics"][role]["accuracy"], tensors["metrics"][role]["accuracy"]
        assert abs(f - t) <= 2 / 480
    assert frames["metrics"]["pipeline"]["baseline"]["from"].endswith("preprocess.yaml")


@dataclass(frozen=True)
class BadFrameSet:
    """A raw-frame golden set on the device that is itself wrong (what a careless device
    image controls): refused as bad input (exit 2), naming the file."""

    id: str
    files: dict[str, Any]
    error: str


def _frames(n: int = 4) -> np.ndarray:
    return np.zeros((n, 8, 8), dtype=np.uint8)


BAD_SETS = [
    BadFrameSet(
        "tensors and frames",
        {"frames.npy": _frames(), "inputs.npy": np.zeros((4, 1, 8, 8), np.float32)},
        "keep one form",
    ),
    BadFrameSet("no labels", {"frames.npy": _frames()}, "labels.npy: missing"),
    BadFrameSet(
        "labels of another length",
        {"frames.npy": _frames(), "labels.npy": np.zeros(3, np.int64)},
        "3 labels for 4 frames",
    ),
    BadFrameSet(
        "flat frames",
        {"frames.npy": np.zeros((4, 64), np.uint8), "labels.npy": np.zeros(4, np.int64)},
        "expected [N, H, W] or [N, H, W, C]",
    ),
    BadFrameSet(
        "five channels",
        {"frames.npy": np.zeros((4, 8, 8, 5), np.uint8), "labels.npy": np.zeros(4, np.int64)},
        "5 channels",
    ),
    BadFrameSet(
        "NaN pixel",
        {"frames.npy": np.full((4, 8, 8), np.nan, np.float32), "labels.npy": np.zeros(4, np.int64)},
        "NaN or infinite pixel",
    ),
    BadFrameSet(
        "segmentation masks",
        {"frames.npy": _frames(), "labels.npy": np.zeros((4, 8, 8), np.int64)},
        "raw frames are for classifiers",
    ),
]


@pytest.mark.parametrize("bad", BAD_SETS, ids=lambda b: b.id)
def test_bad_frame_sets_are_refused_by_name(tmp_path: Path, bad: BadFrameSet) -> None:
    for name, arr in bad.files.items():
        np.save(tmp_path / name, arr, allow_pickle=False)
    with pytest.raises(GoldenSetError, match=bad.error.replace("[", r"\[").replace("(", r"\(")):
        load_golden_set(tmp_path)


def test_a_frames_folder_reads_in_name_order_and_hashes_each_file(tmp_path: Path) -> None:
    one = np.load(RAW / "frames.npy")[:6]
    labels = np.load(RAW / "labels.npy")[:6]
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(one):
        np.save(tmp_path / "frames" / f"{i:04d}.npy", frame, allow_pickle=False)
    np.save(tmp_path / "labels.npy", labels, allow_pickle=False)
    golden = load_golden_set(tmp_path)
    assert golden.form == "frames" and golden.rows == 6
    assert golden.frames is not None and all(
        np.array_equal(a, b) for a, b in zip(golden.frames, one)
    )
    assert golden.sha256 == golden_set_sha256(tmp_path)
    before = golden.sha256
    np.save(tmp_path / "frames" / "0003.npy", one[0], allow_pickle=False)
    assert load_golden_set(tmp_path).sha256 != before


def test_cli_gate_on_frames_names_the_pipeline(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "agent.cli"]
    ok = subprocess.run(
        [
            *cli,
            *("gate", "--baseline", str(DEMO / "digits_fp32.onnx")),
            *("--candidate", str(DEMO / "digits_fp32.onnx"), "--golden", str(RAW)),
            *("--policy", str(_lenient_latency(tmp_path))),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "pipeline" in ok.stdout and "all fit" in ok.stdout
    assert ok.stdout.rstrip().endswith("gate PASS")


def _lenient_latency(tmp: Path) -> Path:
    policy = tmp / "policy.yaml"
    policy.write_text(
        (RAW / "policy.yaml")
        .read_text()
        .replace("latency_p95_slack_ms: 0.5", "latency_p95_slack_ms: 1000")
    )
    return policy


def test_build_golden_set_frames_form_matches_the_shipped_set(repo_root: Path) -> None:
    tool = repo_root / "tools" / "build_golden_set.py"
    done = subprocess.run(
        [sys.executable, str(tool), "--form", "frames", "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "matches a fresh build" in done.stdout
    frames = np.load(RAW / "frames.npy")
    tensors = np.load(GOLDEN / "inputs.npy")
    assert frames.dtype == np.uint8 and frames.shape == (480, 8, 8)
    assert np.abs(frames / 255.0 - tensors[:, 0]).max() <= 0.5 / 255 + 1e-6
    assert sum(p.stat().st_size for p in RAW.iterdir()) < 1 << 20


def test_the_committed_row_and_its_event_carry_drift_and_gate_margin(tmp_path: Path) -> None:
    from agent.config import TelemetryConfig
    from agent.telemetry.recorder import TelemetryRecorder

    dev = frame_device(tmp_path)
    install_v1(dev)
    db = tmp_path / "telemetry.db"
    cfg = TelemetryConfig(sample_rate=0.0, flush_interval_s=0.01)
    recorder = TelemetryRecorder(cfg, "test-device-1", db, boot_id="b", start_uploader=False)
    svc = dev.service(recorder=recorder)
    try:
        assert svc.install_file(package_tar(dev, "1.1.0", 2, digits())).state is (
            OTAState.PROBATION
        )
        # live results of the new model: every class alike, as on the golden set
        meta = {"model": "digits", "version": "1.1.0"}
        for seq in range(300):
            recorder.observe_inference(seq, 0.001, seq % 10, 0.97, meta)
        assert recorder.flush()
        since = recorder.drift_since_live("digits", "1.1.0")
        assert since is not None and since.frames == 300
        feed_frames(svc, 20)
        committed = svc.journal.last()
        assert committed is not None and committed.state is OTAState.COMMITTED
        quality = committed.detail["quality"]
        assert quality["drift_psi"] == round(since.class_psi, 6) and quality["drift_psi"] < 0.1
        assert quality["gate_margin"] >= 0
        assert recorder.flush()
    finally:
        svc.close()
        recorder.close()
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = [
            json.loads(r[0])
            for r in conn.execute("SELECT attrs FROM records WHERE name = 'ota.state'")
        ]
    committed_events = [r for r in rows if r["state"] == "COMMITTED"]
    assert committed_events[-1]["quality.drift_psi"] == quality["drift_psi"]
    assert committed_events[-1]["quality.gate_margin"] == quality["gate_margin"]
    # rows without figures send none
    assert not any(k.startswith("quality.") for r in rows if r["state"] != "COMMITTED" for k in r)


def test_cli_install_without_a_daemon_runs_probation_on_the_golden_frames(tmp_path: Path) -> None:
    import yaml

    dev = frame_device(tmp_path)
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": "test-device-1",
                "state_dir": str(dev.state_dir),
                "telemetry": {"enabled": False},
                "ota": {
                    "enabled": True,
                    "golden_dir": str(dev.config.ota.golden_dir),
                    "probation_frames": 20,
                    "probation_s": 0.0,
                    "reserve_free_bytes": 0,
                },
            }
        )
    )
    cli = [sys.executable, "-m", "agent.cli"]
    for version, counter, model in (
        ("1.0.0", 1, "digits_fp32.onnx"),
        ("1.1.0", 2, "digits_int8.onnx"),
    ):
        tar = package_tar(dev, version, counter, digits(model))
        done = subprocess.run(
            [*cli, "install", str(tar), "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        # each package's own preprocessing turned the frames into its probation inputs
        assert f"installed digits {version}" in done.stdout
        assert "probation passed: state COMMITTED" in done.stdout


def test_gate_margin_is_the_check_nearest_to_failing_in_its_own_units() -> None:
    from agent.ota.gate_report import GateCheck, smallest_margin

    checks = [
        GateCheck("pipeline", "pass", 0.0, 0.0, "<=", ""),
        GateCheck("accuracy", "pass", 0.2, -0.3, ">=", ""),  # 0.5 pp, 167 % of its limit
        GateCheck("agreement", "pass", 0.99, 0.98, ">=", ""),  # 0.01, 1 % of its limit
        GateCheck("latency_p95", "pass", 0.4, 0.5, "<=", ""),  # 0.1 ms, 20 %
        GateCheck("logit_cosine", "skip", 0.5, 0.999, ">=", ""),
    ]
    name, margin = smallest_margin(checks) or ("", 0.0)
    assert name == "agreement" and margin == pytest.approx(0.01)
    # agreement passed by its softmax-MSE alternative: its own margin is no figure
    checks[2] = GateCheck("agreement", "pass", 0.97, 0.98, ">=", "")
    assert smallest_margin(checks) == ("latency_p95", pytest.approx(0.1))
    assert smallest_margin(checks[:1]) is None
