"""The .deb under systemd as PID 1, on an emulated arm64 root, the suite on 3.13 (slow, root)."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, SLOW, needs_dpkg, needs_system_python, run

DEB_DIR = REPO / "packaging" / "deb"
SKIP_RC = 77  # the scripts' "this machine cannot run it" exit status

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap, mount and nspawn need root")
slow = pytest.mark.skipif(
    not SLOW,
    reason="boots a Debian root, apt and pip from the network; EDGE_AGENT_SLOW=1",
)


def run_script(argv: list[str]) -> str:
    done = run(argv)
    print(done.stdout)
    if done.returncode == SKIP_RC:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    return done.stdout


def assert_ok(stdout: str, steps: tuple[str, ...]) -> None:
    assert not re.search(r"^FAIL ", stdout, re.M), stdout
    for step in steps:
        assert re.search(rf"^ok    {re.escape(step)}", stdout, re.M), step


@needs_root
@needs_dpkg
@needs_system_python
@pytest.mark.slow
@slow
@pytest.mark.timeout(2400)
def test_deb_under_systemd_as_pid1(full_deb: Path) -> None:
    out = run_script(["bash", str(DEB_DIR / "test_under_systemd.sh"), "--deb", str(full_deb)])
    summary = re.search(r"^systemd-test: (\d+) passed, 0 failed", out, re.M)
    assert summary is not None and int(summary.group(1)) >= 40
    assert_ok(
        out,
        (
            "apt-get install ./",
            "unit active",
            "STATUS= from the agent shown by systemd",
            "journald has the agent's log lines",
            "... but stays activating, never active",
            "systemctl reload, good config",
            "systemctl reload, bad config: the refusal is in the journal",
            "the watchdog fires",
            "... and systemd restarts it",
            "crash at start, Restart=on-failure",
            "systemd-analyze security edge-agent",
            "ProtectSystem=strict: writes to /opt/edge-agent",
            "edge-agent install digits-1.1.0.tar through the control socket",
            "after remove: /var/lib/edge-agent kept",
            "after purge: /var/lib/edge-agent gone",
        ),
    )


@needs_root
@pytest.mark.slow
@slow
@pytest.mark.skipif(
    not Path("/usr/bin/qemu-aarch64-static").exists(),
    reason="apt install qemu-user-static binfmt-support",
)
# the script bounds itself to 30 min (--time-limit); a cold cache adds ~80 min of debootstrap
@pytest.mark.timeout(7200)
def test_arm64_deb_and_demo_story_under_qemu() -> None:
    out = run_script(["nice", "-n", "10", "bash", str(DEB_DIR / "test_arm64.sh")])
    assert re.search(r"^arm64-test: \d+ passed, 0 failed", out, re.M)
    assert_ok(
        out,
        (
            "the root runs aarch64 binaries",
            "its Architecture is arm64",
            "apt-get install ./edge-agent_",
            "edge-agent infer digits_int8.onnx",
            "edge-agent infer digits_int8.tflite",
            "FP32 ONNX and both TFLite models agree with x86-64",
            "edge-agent gate INT8 vs FP32 on golden_local passes on arm64",
            "a tampered 1.1.0 (one model byte flipped) is refused, exit 3",
            "hot swap: 1.1.0 COMMITTED in the same process",
            "edge-agent rollback through the daemon",
            "the run stayed within --time-limit",
        ),
    )


@needs_root
@pytest.mark.slow
@slow
@pytest.mark.timeout(5400)
def test_suite_passes_on_python_313() -> None:
    # the suite inside gets a clean environment (no EDGE_AGENT_SLOW): it never recurses
    out = run_script(["nice", "-n", "10", "bash", str(DEB_DIR / "test_python313.sh")])
    assert re.search(r"^python313-test: pytest exit 0 on Python 3\.13\.", out, re.M)


@dataclass(frozen=True)
class Usage:
    script: str
    argv: tuple[str, ...]
    message: str


USAGE_ROWS = [
    Usage("test_under_systemd.sh", ("--frobnicate",), "Error: unknown option --frobnicate"),
    Usage(
        "test_under_systemd.sh",
        ("--deb", "/nonexistent.deb"),
        "Error: /nonexistent.deb: .deb not found",
    ),
    Usage("test_arm64.sh", ("--frobnicate",), "Error: unknown option --frobnicate"),
    Usage(
        "test_arm64.sh", ("--deb", "/nonexistent.deb"), "Error: /nonexistent.deb: .deb not found"
    ),
    Usage("test_arm64.sh", ("--time-limit", "soon"), "Error: --time-limit soon: expected whole"),
    Usage("test_python313.sh", ("--frobnicate",), "Error: unknown option --frobnicate"),
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash missing")
@pytest.mark.parametrize("row", USAGE_ROWS, ids=lambda r: f"{r.script}{'-'.join(r.argv)}")
def test_scripts_refuse_bad_usage(row: Usage) -> None:
    done = run(["bash", str(DEB_DIR / row.script), *row.argv])
    assert done.returncode == 2, done.stdout + done.stderr
    assert row.message in done.stderr
    done = run(["bash", str(DEB_DIR / row.script), "--help"])
    assert done.returncode == 0 and "Example:" in done.stdout
