"""`edge-agent gate`: exit codes, the table naming what failed, the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent.cli import main


def _gate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["gate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pass_exits_0_and_writes_the_report(tmp_path, capsys, demo_models, golden_dir):
    report = tmp_path / "r" / "gate.json"
    code, out, err = _gate(
        capsys,
        "--baseline",
        str(demo_models / "digits_fp32.onnx"),
        "--candidate",
        str(demo_models / "digits_int8.onnx"),
        "--golden",
        str(golden_dir),
        "--report",
        str(report),
    )
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "gate PASS"
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["failed"] == []
    names = {c["name"] for c in data["checks"]}
    assert {
        "accuracy",
        "macro_f1",
        "ece",
        "agreement",
        "logit_cosine",
        "class_recall",
        "latency_p95",
        "memory",
    } <= names
    for check in data["checks"]:
        assert {"value", "threshold", "verdict", "comparison", "detail"} <= set(check)


def test_fail_exits_3_and_names_the_class(capsys, variants, demo_models, golden_dir):
    code, out, _ = _gate(
        capsys,
        "--baseline",
        str(demo_models / "digits_fp32.onnx"),
        "--candidate",
        str(variants["bias_lowered"]),
        "--golden",
        str(golden_dir),
    )
    assert code == 3
    last = out.strip().splitlines()[-1]
    assert last.startswith("gate FAIL") and "class 3 recall" in last
    assert "FAIL" in next(line for line in out.splitlines() if line.startswith("class_recall"))


def test_package_gate_option_reports_ignored_loosening(capsys, demo_models, golden_dir):
    code, out, _ = _gate(
        capsys,
        "--baseline",
        str(demo_models / "digits_fp32.onnx"),
        "--candidate",
        str(demo_models / "digits_int8.onnx"),
        "--golden",
        str(golden_dir),
        "--package-gate",
        '{"accuracy_drop_max_pp": 5}',
        "--json",
    )
    data = json.loads(out)
    assert code == 0
    assert data["policy"]["accuracy_drop_max_pp"] == 0.3
    assert data["policy_changes"][0]["applied"] is False


def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, demo_models, golden_dir):
    bad = tmp_path / "g"
    bad.mkdir()
    np.save(bad / "inputs.npy", np.load(golden_dir / "inputs.npy"))
    np.save(bad / "labels.npy", np.load(golden_dir / "labels.npy")[:10])
    code, out, err = _gate(
        capsys,
        "--baseline",
        str(demo_models / "digits_fp32.onnx"),
        "--candidate",
        str(demo_models / "digits_int8.onnx"),
        "--golden",
        str(bad),
    )
    assert code == 2
    assert err.startswith("Error: ") and "lengths differ" in err
    assert "Traceback" not in err and out == ""
    code, _, err = _gate(
        capsys, "--baseline", "nope.onnx", "--candidate", "nope.onnx", "--golden", str(golden_dir)
    )
    assert code == 2 and "not found" in err
    code, _, err = _gate(
        capsys,
        "--baseline",
        str(demo_models / "digits_fp32.onnx"),
        "--candidate",
        str(demo_models / "digits_int8.onnx"),
        "--golden",
        str(golden_dir),
        "--package-gate",
        "{not json",
    )
    assert code == 2 and err.startswith("Error: --package-gate")


def test_real_console_script_different_output_size_exits_2(variants, demo_models, golden_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "-q",
            "gate",
            "--baseline",
            str(demo_models / "digits_fp32.onnx"),
            "--candidate",
            str(variants["eleven_outputs"]),
            "--golden",
            str(golden_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "different output size" in proc.stderr


def test_help_has_an_example(capsys):
    try:
        main(["gate", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "example:\n  edge-agent gate --baseline" in capsys.readouterr().out


def test_build_golden_set_is_reproducible(repo_root: Path, tmp_path: Path):
    tool = repo_root / "tools" / "build_golden_set.py"
    check = subprocess.run(
        [sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr
    subprocess.run(
        [sys.executable, str(tool), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    labels = np.load(tmp_path / "labels.npy")
    slices = np.load(tmp_path / "slices.npy")
    assert len(labels) == 480 and set(slices.tolist()) == {"bold", "thin", "dim"}
    assert (tmp_path / "policy.yaml").is_file()
