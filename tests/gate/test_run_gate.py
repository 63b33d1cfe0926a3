"""run_gate end to end on real ONNX/TFLite models and the shipped golden set."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.errors import EdgeAgentError, GoldenSetError, InputDataError, ModelError, UsageError
from agent.ota.gate_cache import cache_key
from agent.ota.gate_data import golden_set_sha256
from agent.ota.golden import run_gate
from agent.runtime import load_backend
from agent.runtime.base import file_sha256

# Every threshold loose except the one a test is about, so each candidate fails for its
# own reason alone.
LOOSE = {
    "accuracy_drop_max_pp": 100.0,
    "f1_drop_max_pp": 100.0,
    "ece_increase_max": 1.0,
    "agreement_min": 0.0,
    "prob_mse_max": 1.0,
    "logit_cosine_min": 0.0,
    "class_recall_drop_max_pp": 100.0,
    "latency_p95_ratio_max": 1000.0,
    "latency_p95_slack_ms": 1000.0,
    "memory_added_max_mb": 100000.0,
}


def _verdicts(report):
    return {c.name: c.verdict for c in report.checks}


def test_int8_digits_passes_against_fp32(demo_models: Path, golden_dir: Path):
    report = run_gate(
        demo_models / "digits_fp32.onnx", demo_models / "digits_int8.onnx", golden_dir
    )
    assert report.passed, report.format_table()
    v = _verdicts(report)
    assert v["logit_cosine"] == "skip"  # fp32 vs int8: closeness is not required
    assert report.models["candidate"]["precision"] == "int8"
    m = report.metrics
    assert 0.9 < m["candidate"]["accuracy"] <= 1.0
    assert set(m["candidate"]["per_slice"]) == {"bold", "thin", "dim"}
    assert m["latency"]["candidate"]["p95_ms"] > 0
    assert np.array(m["candidate"]["confusion_matrix"]).sum() == report.golden["rows"]


def test_int8_tflite_passes_against_fp32_onnx(demo_models: Path, golden_dir: Path):
    report = run_gate(
        demo_models / "digits_fp32.onnx", demo_models / "digits_int8.tflite", golden_dir
    )
    assert report.passed, report.format_table()
    assert report.models["candidate"]["backend"] == "litert"


def test_same_model_passes_every_check_including_closeness(
    variants: dict[str, Path], demo_models: Path, golden_dir: Path
):
    report = run_gate(demo_models / "digits_fp32.onnx", variants["fp32_copy"], golden_dir)
    assert report.passed
    assert _verdicts(report)["logit_cosine"] == "pass"
    assert report.metrics["agreement"]["top1_agreement"] == 1.0


def test_scaled_logits_fail_on_calibration_alone(
    variants: dict[str, Path], demo_models: Path, golden_dir: Path
):
    report = run_gate(demo_models / "digits_fp32.onnx", variants["scaled"], golden_dir)
    assert not report.passed
    assert [c.name for c in report.failed_checks] == ["ece"]
    assert report.metrics["agreement"]["top1_agreement"] == 1.0  # same argmax
    assert "ECE" in report.format_table().splitlines()[-1]


def test_lowered_bias_fails_on_that_class_recall(
    variants: dict[str, Path], demo_models: Path, golden_dir: Path, bias_lowered_class: int
):
    policy = {**LOOSE, "class_recall_drop_max_pp": 2.0}
    report = run_gate(
        demo_models / "digits_fp32.onnx", variants["bias_lowered"], golden_dir, policy=policy
    )
    assert [c.name for c in report.failed_checks] == ["class_recall"]
    (check,) = report.failed_checks
    assert check.detail.startswith(f"class {bias_lowered_class} recall")
    assert f"class {bias_lowered_class} recall" in report.format_table().splitlines()[-1]
    # Under the device's own policy it fails too (and more checks with it).
    strict = run_gate(demo_models / "digits_fp32.onnx", variants["bias_lowered"], golden_dir)
    assert "class_recall" in [c.name for c in strict.failed_checks]


def test_slower_model_fails_on_latency_alone(
    variants: dict[str, Path], demo_models: Path, golden_dir: Path
):
    report = run_gate(demo_models / "digits_fp32.onnx", variants["slow"], golden_dir)
    assert [c.name for c in report.failed_checks] == ["latency_p95"]
    assert report.metrics["agreement"]["top1_agreement"] == 1.0


def test_memory_limit_is_checked(demo_models: Path, golden_dir: Path):
    report = run_gate(
        demo_models / "digits_fp32.onnx",
        demo_models / "digits_int8.onnx",
        golden_dir,
        policy={**LOOSE, "memory_added_max_mb": 0.0},
    )
    mem = next(c for c in report.checks if c.name == "memory")
    # RSS can stay flat for a tiny model; the check must say pass only when it is 0.
    assert mem.verdict == ("pass" if mem.value == 0 else "fail")


def test_different_output_size_is_bad_input(
    variants: dict[str, Path], demo_models: Path, golden_dir: Path
):
    with pytest.raises(ModelError, match="different output size"):
        run_gate(demo_models / "digits_fp32.onnx", variants["eleven_outputs"], golden_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda g: {"inputs": g["inputs"].reshape(len(g["inputs"]), 64)}, "does not fit"),
        (lambda g: {"inputs": g["inputs"].astype(np.float64)}, "dtype float64"),
        (lambda g: {"inputs": _with_nan(g["inputs"])}, "NaN"),
        (lambda g: {"labels": np.where(g["labels"] == 9, 10, g["labels"])}, "label 10"),
        (lambda g: {"labels": g["labels"] - 1}, "negative label"),
        (lambda g: {"labels": g["labels"].astype(np.float32)}, "integer class ids"),
        (
            lambda g: {
                "inputs": g["inputs"][:0],
                "labels": g["labels"][:0],
                "slices": g["slices"][:0],
            },
            "empty",
        ),
        (lambda g: {"labels": g["labels"][:-1]}, "lengths differ"),
        (lambda g: {"slices": g["slices"][:-3]}, "lengths differ"),
        (
            lambda g: {"reference": np.full((len(g["labels"]), 10), np.nan, np.float32)},
            "finite float",
        ),
    ],
)
def test_bad_golden_sets_are_refused(make_golden, golden_dir, demo_models, change, message):
    shipped = {n: np.load(golden_dir / f"{n}.npy") for n in ("inputs", "labels", "slices")}
    folder = make_golden(**change(shipped))
    with pytest.raises(UsageError, match=message) as info:
        run_gate(demo_models / "digits_fp32.onnx", demo_models / "digits_int8.onnx", folder)
    assert isinstance(info.value, (GoldenSetError, InputDataError))
    assert info.value.exit_code == 2


def _with_nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[17, 0, 3, 3] = np.nan
    return x


def test_missing_golden_files_are_refused(tmp_path: Path, demo_models: Path):
    (tmp_path / "g").mkdir()
    with pytest.raises(GoldenSetError, match=r"inputs\.npy: missing"):
        run_gate(demo_models / "digits_fp32.onnx", demo_models / "digits_int8.onnx", tmp_path / "g")


def _install_package(root: Path, model: Path, gate: dict | None, precision: str) -> Path:
    root.mkdir(parents=True)
    shutil.copy(model, root / "model.onnx")
    blob = (root / "model.onnx").read_bytes()
    manifest = {
        "format": 1,
        "name": "digits",
        "version": "1.1.0",
        "release_counter": 2,
        "created": "2026-11-23T12:00:00Z",
        "task": "classification",
        "runtime": {"kind": "onnx", "precision": precision, "model": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "labels": [str(i) for i in range(10)],
        "files": [
            {"path": "model.onnx", "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        ],
    }
    if gate is not None:
        manifest["gate"] = gate
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_package_dirs_and_their_gate_tighten_only(tmp_path: Path, demo_models: Path, golden_dir):
    base = _install_package(
        tmp_path / "digits-1.0.0", demo_models / "digits_fp32.onnx", None, "fp32"
    )
    cand = _install_package(
        tmp_path / "digits-1.1.0",
        demo_models / "digits_int8.onnx",
        {"agreement_min": 0.999, "prob_mse_max": 1e-9, "latency_p95_slack_ms": 50.0},
        "int8",
    )
    report = run_gate(base, cand, golden_dir)
    assert report.policy["agreement_min"] == 0.999  # tightened by the package
    assert report.policy["latency_p95_slack_ms"] == 0.5  # the loosening was ignored
    ignored = [c.key for c in report.ignored_policy_changes]
    assert ignored == ["latency_p95_slack_ms"]
    assert "latency_p95_slack_ms=50.0 ignored" in report.format_table()
    assert report.to_dict()["policy_changes"][2]["applied"] is False
    # INT8 agrees on ~99.6% of rows, under the package's stricter 99.9%.
    assert "agreement" in [c.name for c in report.failed_checks]
    assert report.models["candidate"]["label"] == "digits-1.1.0"


def test_package_without_a_manifest_is_bad_input(tmp_path: Path, demo_models: Path, golden_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no manifest\.json"):
        run_gate(demo_models / "digits_fp32.onnx", tmp_path / "empty", golden_dir)


def test_package_whose_model_escapes_is_refused(tmp_path: Path, demo_models: Path, golden_dir):
    pkg = _install_package(tmp_path / "p", demo_models / "digits_int8.onnx", None, "int8")
    data = json.loads((pkg / "manifest.json").read_text())
    data["runtime"]["model"] = "../../etc/passwd"
    data["files"][0]["path"] = "../../etc/passwd"
    (pkg / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EdgeAgentError, match="passwd") as info:
        run_gate(demo_models / "digits_fp32.onnx", pkg, golden_dir)
    assert info.value.exit_code in (2, 3)


def test_backends_can_be_passed_and_progress_reaches_one(demo_models: Path, golden_dir: Path):
    seen: list[float] = []
    base = load_backend(demo_models / "digits_fp32.onnx")
    report = run_gate(base, demo_models / "digits_int8.onnx", golden_dir, progress=seen.append)
    assert report.passed
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 10


def test_baseline_cache_reuses_outputs_and_latencies(
    tmp_path: Path, demo_models: Path, golden_dir: Path
):
    cache = tmp_path / "cache"
    first = run_gate(
        demo_models / "digits_fp32.onnx",
        demo_models / "digits_int8.onnx",
        golden_dir,
        baseline_cache=cache,
    )
    assert first.baseline_cache["used"] is False
    assert first.baseline_cache["stored"] == ["baseline", "candidate"]
    second = run_gate(
        demo_models / "digits_fp32.onnx",
        demo_models / "digits_int8.onnx",
        golden_dir,
        baseline_cache=cache,
    )
    assert second.baseline_cache["used"] is True
    assert second.metrics["latency"]["baseline_from_cache"] is True
    # Baseline latency and outputs come from the cache: identical figures.
    assert second.metrics["latency"]["baseline"] == first.metrics["latency"]["baseline"]
    assert second.metrics["baseline"] == first.metrics["baseline"]
    assert second.passed == first.passed
    assert second.models["baseline"]["precision"] == "fp32"
    # The candidate's run was stored too: once activated it is the next baseline.
    third = run_gate(
        demo_models / "digits_int8.onnx",
        demo_models / "digits_fp32.onnx",
        golden_dir,
        baseline_cache=cache,
    )
    assert third.baseline_cache["used"] is True
    assert third.models["baseline"]["precision"] == "int8"


def test_broken_cache_entry_is_a_miss_not_a_crash(
    tmp_path: Path, demo_models: Path, golden_dir: Path
):
    cache = tmp_path / "cache"
    args = (demo_models / "digits_fp32.onnx", demo_models / "digits_int8.onnx", golden_dir)
    run_gate(*args, baseline_cache=cache)
    backend_id = run_gate(*args, baseline_cache=cache).baseline_cache["backend"]

    key = cache_key(
        file_sha256(demo_models / "digits_fp32.onnx"), golden_set_sha256(golden_dir), backend_id
    )
    (cache / key / "outputs.npy").write_bytes(b"not an npy file")
    report = run_gate(*args, baseline_cache=cache)
    assert report.baseline_cache["used"] is False
    assert report.passed
    again = run_gate(*args, baseline_cache=cache)  # the miss rewrote the entry
    assert again.baseline_cache["used"] is True


def test_cache_is_keyed_by_the_golden_set(
    tmp_path: Path, demo_models: Path, golden_dir: Path, make_golden
):
    cache = tmp_path / "cache"
    args = (demo_models / "digits_fp32.onnx", demo_models / "digits_int8.onnx")
    run_gate(*args, golden_dir, baseline_cache=cache)
    labels = np.load(golden_dir / "labels.npy")
    other = make_golden(labels=np.roll(labels, 1))
    assert run_gate(*args, other, baseline_cache=cache).baseline_cache["used"] is False


def test_unwritable_cache_does_not_change_the_verdict(
    tmp_path: Path, demo_models: Path, golden_dir: Path
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    report = run_gate(
        demo_models / "digits_fp32.onnx",
        demo_models / "digits_int8.onnx",
        golden_dir,
        baseline_cache=blocker / "cache",
    )
    assert report.passed
    assert report.baseline_cache["used"] is False
    assert report.baseline_cache["stored"] == []
