"""`edge-agent gate` runs the gate in the OTA gate's child process, under the same limits:
a candidate that hangs, crashes or eats memory fails the gate (exit 3) instead of taking
the operator's shell with it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agent.ota.gate_process import GATE_KILL_AT_ENV
from agent.ota.killpoint import KILL_SIGNAL_ENV

from .fault_models import hanging_model, hungry_model

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "agent" / "demo" / "models" / "digits_fp32.onnx"
INT8 = DIGITS.with_name("digits_int8.onnx")
GOLDEN = REPO / "golden_local"
GATE_TIMEOUT_S = 15
GATE_MEMORY_MB = 768
# far above any gate of the demo model, far below a hang
CLI_WAIT_S = 240


def candidate_package(folder: Path, model: bytes) -> Path:
    """An installed-package folder (manifest + model), as `edge-agent gate` accepts it."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model)
    manifest = {
        "name": "digits",
        "version": "1.1.0",
        "task": "classification",
        "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@dataclasses.dataclass(frozen=True)
class CliCandidate:
    """What the candidate's author controls: its model bytes (and, for a native crash, the
    fault the runtime hits while loading it); the verdict the operator's shell sees."""

    id: str
    model: bytes
    env: dict[str, str]
    reason: str


CANDIDATES = [
    CliCandidate("hangs", hanging_model(), {}, f"gate timed out after {GATE_TIMEOUT_S} s"),
    CliCandidate(
        "crashes-the-runtime",
        DIGITS.read_bytes(),
        {GATE_KILL_AT_ENV: "model.load:digits-1.1.0", KILL_SIGNAL_ENV: "SIGSEGV"},
        "gate process killed by SIGSEGV",
    ),
    CliCandidate(
        "exhausts-memory",
        hungry_model(4096),
        {},
        f"gate process ran out of memory (limit {GATE_MEMORY_MB} MB)",
    ),
]


def gate_children_of(pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if "agent.ota.gate_process" in " ".join(proc.cmdline()) and proc.ppid() == pid:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("row", CANDIDATES, ids=[r.id for r in CANDIDATES])
def test_a_bad_candidate_fails_the_cli_gate_within_its_limits(
    row: CliCandidate, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        (GOLDEN / "policy.yaml").read_text()
        + f"gate_timeout_s: {GATE_TIMEOUT_S}\ngate_memory_max_mb: {GATE_MEMORY_MB}\n"
    )
    candidate = candidate_package(tmp_path / "candidate", row.model)
    report = tmp_path / "gate.json"
    env = {**__import__("os").environ, **row.env}
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable, "-m", "agent.cli", "-q", "gate", "--baseline", str(DIGITS),
            "--candidate", str(candidate), "--golden", str(GOLDEN), "--policy", str(policy),
            "--report", str(report),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=CLI_WAIT_S,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"gate FAIL: {row.reason}", done.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["error"] == row.reason
    if row.id == "hangs":
        # ended by its deadline, not by the test's
        assert time.monotonic() - started < CLI_WAIT_S
    assert "Traceback" not in done.stderr


def test_a_killed_cli_leaves_no_gate_running(tmp_path: Path) -> None:
    candidate = candidate_package(tmp_path / "candidate", hanging_model())
    cli = subprocess.Popen(
        [
            sys.executable, "-m", "agent.cli", "-q", "gate", "--baseline", str(DIGITS),
            "--candidate", str(candidate), "--golden", str(GOLDEN),
        ],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and not children:
            children = gate_children_of(cli.pid)
            time.sleep(0.2)
        assert children, "the CLI never started its gate child"
        cli.kill()  # SIGKILL: no finally runs in the CLI
        cli.wait(30)
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "the gate child outlived the CLI"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)


def test_the_cli_gate_passes_through_the_child_with_its_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    policy = tmp_path / "policy.yaml"
    policy.write_text((GOLDEN / "policy.yaml").read_text() + "accuracy_drop_max_pp: 0.25\n")
    code = main(
        [
            "gate", "--baseline", str(DIGITS), "--candidate", str(INT8), "--golden", str(GOLDEN),
            "--policy", str(policy), "--package-gate",
            '{"accuracy_drop_max_pp": 0.2, "memory_added_max_mb": 999}', "--json",
        ]
    )  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert code == 0, data
    # --policy and --package-gate reached the child: tightened, the loosening ignored
    assert data["policy"]["accuracy_drop_max_pp"] == 0.2
    assert [c["key"] for c in data["policy_changes"] if not c["applied"]] == ["memory_added_max_mb"]
    # loaded as the daemon loads models (config.model's options), in another process
    assert data["models"]["candidate"]["options"]["intra_op_threads"] == 1
