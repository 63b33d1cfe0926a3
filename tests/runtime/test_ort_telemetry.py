"""onnxruntime's own telemetry stays off on a device unless the operator turns it on.

onnxruntime 1.29+ wheels on Linux keep a device id and an event cache under
$HOME/.cache/Microsoft and upload usage events unless ORT_DISABLE_TELEMETRY=1 is set before
the library loads (checked by hand with 1.32: without the variable the cache appears; with
it, nothing). No test here runs onnxruntime with its telemetry on: that would try to reach
Microsoft's servers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# onnxruntime keeps quiet by itself on CI runners it recognises; these must not hide what
# the agent does
CI_MARKERS = (
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
)

LOAD_AND_RUN = """
import sys
import numpy as np
from agent.runtime import BackendOptions, load_backend
backend = load_backend(sys.argv[1], "onnx", BackendOptions())
backend.run(np.zeros((1, 1, 8, 8), np.float32))
import os
print(os.environ.get("ORT_DISABLE_TELEMETRY"))
"""

IMPORT_ONLY = "import os, agent; print(os.environ.get('ORT_DISABLE_TELEMETRY'))"


def run_python(code: str, home: Path, repo_root: Path, *args: str, **extra: str) -> str:
    env = {
        k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY" and k not in CI_MARKERS
    }
    env.update(HOME=str(home), PYTHONPATH=str(repo_root), **extra)
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


def test_running_a_model_leaves_no_onnxruntime_telemetry_state(
    tmp_path: Path, repo_root: Path
) -> None:
    model = repo_root / "agent" / "demo" / "models" / "digits_fp32.onnx"
    home = tmp_path / "home"
    assert run_python(LOAD_AND_RUN, home, repo_root, str(model)) == "1"
    assert not (home / ".cache" / "Microsoft").exists()


def test_an_operator_choice_is_kept(tmp_path: Path, repo_root: Path) -> None:
    # only imports the agent: onnxruntime never loads with its telemetry on in the tests
    assert run_python(IMPORT_ONLY, tmp_path, repo_root, ORT_DISABLE_TELEMETRY="0") == "0"
    assert run_python(IMPORT_ONLY, tmp_path, repo_root) == "1"
