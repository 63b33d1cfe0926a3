"""onnxruntime's own telemetry stays off on a device unless the operator turns it on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LOAD_AND_RUN = """
import sys
import numpy as np
from agent.runtime import BackendOptions, load_backend
backend = load_backend(sys.argv[1], "onnx", BackendOptions())
backend.run(np.zeros((1, 1, 8, 8), np.float32))
import os
print(os.environ.get("ORT_DISABLE_TELEMETRY"))
"""


def run_agent_model(home: Path, model: Path, repo_root: Path, **extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    # ORT also stays quiet on CI runners it recognises; this test must see the default
    env = {k: v for k, v in env.items() if k not in ("GITHUB_ACTIONS", "TF_BUILD")}
    env.update(HOME=str(home), PYTHONPATH=str(repo_root), **extra)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


def test_agent_opts_out_of_onnxruntime_telemetry(tmp_path: Path, repo_root: Path) -> None:
    model = repo_root / "agent" / "demo" / "models" / "digits_fp32.onnx"
    # the control: with the opt-out explicitly off, this onnxruntime build keeps a device
    # id and an event cache under $HOME (wheels >= 1.29 on Linux do)
    control = tmp_path / "control"
    assert run_agent_model(control, model, repo_root, ORT_DISABLE_TELEMETRY="0") == "0"
    if not (control / ".cache" / "Microsoft").exists():
        pytest.skip("this onnxruntime build keeps no telemetry state; nothing to turn off")
    # the agent's default: nothing written under $HOME, the opt-out set for the process
    home = tmp_path / "home"
    assert run_agent_model(home, model, repo_root) == "1"
    assert not (home / ".cache" / "Microsoft").exists()
