"""`edge-agent infer` and `bench-model` as a user runs them: real subprocesses, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import load_backend


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "name", ["digits_fp32.onnx", "digits_int8.onnx", "digits_fp32.tflite", "digits_int8.tflite"]
)
def test_infer_writes_float32_first_output(
    name: str, tmp_path: Path, demo_models: Path, digits_rows: np.ndarray
) -> None:
    x = tmp_path / "x.npy"
    y = tmp_path / "y.npy"
    np.save(x, digits_rows[:37])
    result = run_cli(
        "infer", "--model", str(demo_models / name), "--input", str(x), "--output", str(y)
    )
    assert result.returncode == 0, result.stderr
    out = np.load(y)
    assert out.dtype == np.float32 and out.shape == (37, 10)
    np.testing.assert_array_equal(out, load_backend(demo_models / name).predict(digits_rows[:37]))


def _assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int, fragment: str
) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_infer_bad_inputs(tmp_path: Path, demo_models: Path) -> None:
    model = str(demo_models / "digits_fp32.onnx")
    out = str(tmp_path / "y.npy")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 64), dtype=np.float32))
    _assert_one_line_error(
        run_cli("infer", "--model", model, "--input", str(wrong), "--output", out),
        2,
        "expects rank 4",
    )
    _assert_one_line_error(
        run_cli("infer", "--model", model, "--input", str(tmp_path / "none.npy"), "--output", out),
        2,
        "file not found",
    )
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _assert_one_line_error(
        run_cli("infer", "--model", model, "--input", str(pickled), "--output", out),
        2,
        "not a plain .npy",
    )
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 1, 8, 8), dtype=np.float32))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage" * 10)
    _assert_one_line_error(
        run_cli("infer", "--model", str(junk), "--input", str(x), "--output", out), 2, "junk.onnx"
    )
    result = run_cli(
        "infer", "--model", model, "--input", str(x), "--output", out, "--backend", "nope"
    )
    assert result.returncode == 2 and "Error: argument --backend" in result.stderr
    _assert_one_line_error(
        run_cli(
            "infer", "--model", model, "--input", str(x), "--output", out, "--provider", "cuda"
        ),
        2,
        "not available",
    )
    assert not Path(out).exists()


def test_bench_model_side_by_side_json(demo_models: Path) -> None:
    result = run_cli(
        "bench-model",
        "--model",
        str(demo_models / "digits_fp32.onnx"),
        "--model",
        str(demo_models / "digits_int8.tflite"),
        "--seconds",
        "0.3",
        "--warmup",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [Path(r["model"]).name for r in rows] == ["digits_fp32.onnx", "digits_int8.tflite"]
    for r in rows:
        assert r["runs"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["throughput_per_s"] > 0
    # Interleaved round-robin: both models ran the same number of times.
    assert rows[0]["runs"] == rows[1]["runs"]


def test_bench_model_table(demo_models: Path) -> None:
    result = run_cli(
        "bench-model", "--model", str(demo_models / "digits_int8.onnx"), "--seconds", "0.2"
    )
    assert result.returncode == 0, result.stderr
    assert "p95 ms" in result.stdout and "digits_int8.onnx" in result.stdout


def test_every_command_has_help_with_an_example() -> None:
    from agent.cli import build_parser

    parser = build_parser()
    sub_actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert sub_actions
    names: list[str] = []

    def walk(action: object, prefix: str) -> None:
        for name, sub in action.choices.items():  # type: ignore[attr-defined]
            nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
            if nested:
                walk(nested[0], f"{prefix}{name} ")
            else:
                names.append(prefix + name)
                assert "example" in sub.format_help(), f"{prefix}{name} --help lacks an example"

    walk(sub_actions[0], "")
    assert "infer" in names and "bench-model" in names


def test_no_command_prints_help_and_exits_2() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "infer" in result.stdout
