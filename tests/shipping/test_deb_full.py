"""The full .deb (every dependency from PyPI in the venv); slow, so only with EDGE_AGENT_SLOW=1."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from .conftest import SLOW, make_pi_tree, needs_dpkg, needs_system_python, run

pytestmark = [
    needs_dpkg,
    needs_system_python,
    pytest.mark.slow,
    pytest.mark.skipif(
        not SLOW,
        reason="builds a venv with all dependencies (minutes); set EDGE_AGENT_SLOW=1",
    ),
]


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory: pytest.TempPathFactory, full_deb: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("full-root")
    assert run(["dpkg", "-x", str(full_deb), str(root)]).returncode == 0
    return full_deb, root


def test_doctor_runs_from_the_unpacked_package(
    full_tree: tuple[Path, Path], tmp_path: Path
) -> None:
    _, root = full_tree
    board = make_pi_tree(tmp_path / "pi")
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    python = root / "opt/edge-agent/venv/bin/python"
    done = run([str(python), "-m", "agent.cli", "doctor", "--json", "--state-dir", str(state),
                "--sysfs-root", str(board / "sys"), "--dev-root", str(board / "dev"),
                "--proc-root", str(board / "proc"),
                "--config", str(root / "etc/edge-agent/agent.yaml")])  # fmt: skip
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["numpy"]["status"] == "ok"
    assert checks["backend onnx"]["status"] == "ok"
    assert checks["backend litert"]["status"] == "ok"  # the litert extra is in the venv
    assert checks["board"]["detail"].startswith("Raspberry Pi")
    done = run([str(python), "-m", "agent.cli", "config", "check",
                str(root / "etc/edge-agent/agent.yaml")])  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed")
def test_full_deb_lintian_has_no_errors(full_tree: tuple[Path, Path]) -> None:
    deb, _ = full_tree
    done = run(["lintian", "--tag-display-limit", "0", str(deb)])
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    print("lintian:\n" + "\n".join(tags))
    assert [t for t in tags if t.startswith("E: ")] == []
