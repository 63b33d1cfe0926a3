"""The gate runs in a child process: a candidate that hangs, crashes or eats memory is
REJECTED, and a running daemon keeps inferring and answering while it is gated."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from agent.errors import GateFailedError
from agent.ota import install
from agent.ota.gate_policy import GatePolicy
from agent.ota.gate_process import GATE_KILL_AT_ENV, GateLimits
from agent.ota.killpoint import KILL_SIGNAL_ENV
from agent.ota.states import OTAState

from .conftest import Device, feed_frames
from .fault_models import hanging_model, hungry_model
from .test_daemon_link import CLI, REPO, cli, daemon_config, status, wait_for

GATE_TIMEOUT_S = 20
GATE_MEMORY_MB = 768


def set_gate_limits(dev: Device, timeout_s: float, memory_mb: float) -> None:
    policy = dev.config.ota.golden_dir
    assert policy is not None
    path = policy / "policy.yaml"
    path.write_text(
        path.read_text() + f"gate_timeout_s: {timeout_s}\ngate_memory_max_mb: {memory_mb}\n"
    )


def install_v1(dev: Device) -> None:
    svc = dev.service()
    svc.install_file(dev.package("1.0.0", 1))
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()


@dataclasses.dataclass(frozen=True)
class BadCandidate:
    """What the candidate's author controls: its model bytes (and, for a native crash,
    the fault the runtime hits while loading it); ``killed_from_outside``: the kernel's OOM
    killer or an operator SIGKILLs the gate child while it runs."""

    id: str
    model: bytes
    env: dict[str, str]
    reason: str
    killed_from_outside: bool = False


DIGITS_BYTES = (Path(__file__).parents[2] / "agent/demo/models/digits_fp32.onnx").read_bytes()
BAD_CANDIDATES = [
    BadCandidate("hangs", hanging_model(), {}, f"gate timed out after {GATE_TIMEOUT_S} s"),
    BadCandidate(
        "crashes-the-runtime",
        (Path(__file__).parents[2] / "agent/demo/models/digits_fp32.onnx").read_bytes(),
        {GATE_KILL_AT_ENV: "model.load:digits-1.1.0", KILL_SIGNAL_ENV: "SIGSEGV"},
        "gate process killed by SIGSEGV",
    ),
    # the rows bench_ota_faults.py's crash_cand and kill_gate rounds draw from
    BadCandidate(
        "aborts-the-runtime",
        DIGITS_BYTES,
        {GATE_KILL_AT_ENV: "model.load:digits-1.1.0", KILL_SIGNAL_ENV: "SIGABRT"},
        "gate process killed by SIGABRT",
    ),
    BadCandidate(
        "sigkilled-while-loading",
        DIGITS_BYTES,
        {GATE_KILL_AT_ENV: "model.load:digits-1.1.0"},
        "gate process killed by SIGKILL",
    ),
    BadCandidate(
        "sigkilled-from-outside-while-hanging",
        hanging_model(),
        {},
        "gate process killed by SIGKILL",
        killed_from_outside=True,
    ),
    BadCandidate(
        "exhausts-memory",
        hungry_model(4096),
        {},
        f"gate process ran out of memory (limit {GATE_MEMORY_MB} MB)",
    ),
]


def is_gate_of(proc: psutil.Process, state_dir: Path | None = None) -> bool:
    """``proc`` is a live gate child (of ``state_dir``'s agent when given)."""
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:  # gone, a zombie, or not ours to read
        return False
    return "agent.ota.gate_process" in line and (state_dir is None or str(state_dir) in line)


def gate_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if is_gate_of(p)]


@pytest.mark.parametrize("row", BAD_CANDIDATES, ids=[r.id for r in BAD_CANDIDATES])
def test_a_bad_candidate_is_rejected_by_the_gate_child(
    device: Device, row: BadCandidate, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_v1(device)
    set_gate_limits(device, GATE_TIMEOUT_S, GATE_MEMORY_MB)
    for key, value in row.env.items():
        monkeypatch.setenv(key, value)
    svc = device.service()
    killer = threading.Thread(target=kill_the_first_gate_child, daemon=True)
    if row.killed_from_outside:
        killer.start()
    with pytest.raises(GateFailedError, match=re.escape(row.reason)):
        svc.install_file(device.package("1.1.0", 2, row.model))
    if row.killed_from_outside:
        killer.join(60)
    last = svc.journal.last()
    assert last is not None and last.state is OTAState.REJECTED, last
    assert last.reason.startswith(row.reason), last.reason
    assert svc.journal.refusal("digits", "1.1.0", "local") is not None
    # this process was never in danger, nothing moved, nothing is left behind
    assert install.read_links(device.state_dir).current == "digits-1.0.0"
    assert not (device.state_dir / "models" / "digits-1.1.0").exists()
    assert not list((device.state_dir / "staging").iterdir())
    assert gate_children() == []
    report = json.loads(svc.journal.get_value("last_gate_report") or "{}")
    assert report["passed"] is False and report["reason"] == last.reason
    # OTA is not stuck: the next release goes through the same service and commits
    for key in row.env:
        monkeypatch.delenv(key)
    svc.install_file(device.package("1.2.0", 3))
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    assert install.read_links(device.state_dir).current == "digits-1.2.0"
    assert not list((device.state_dir / "staging").iterdir())
    svc.close()


def kill_the_first_gate_child(timeout_s: float = 60.0) -> None:
    """SIGKILL the gate child of this process once it is running (from outside it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = gate_children()
        if children:
            time.sleep(0.5)  # in the runtime by now: the hanging model's first inference
            children[0].send_signal(signal.SIGKILL)
            return
        time.sleep(0.02)


def test_gate_limits_come_from_the_policy_and_a_package_may_only_tighten(
    device: Device,
) -> None:
    golden = device.config.ota.golden_dir
    assert golden is not None
    shipped = GateLimits.from_policy(golden, None)
    assert (shipped.timeout_s, shipped.memory_max_mb) == (
        GatePolicy().gate_timeout_s,
        GatePolicy().gate_memory_max_mb,
    )
    set_gate_limits(device, 60, 900)
    tighter = GateLimits.from_policy(golden, {"gate_timeout_s": 30, "gate_memory_max_mb": 500})
    assert (tighter.timeout_s, tighter.memory_max_mb) == (30, 500)
    looser = GateLimits.from_policy(golden, {"gate_timeout_s": 9999, "gate_memory_max_mb": 1e6})
    assert (looser.timeout_s, looser.memory_max_mb) == (60, 900)


def test_the_daemon_infers_and_answers_while_a_candidate_hangs_in_the_gate(
    device: Device,
) -> None:
    install_v1(device)
    svc = device.service()
    svc.install_file(device.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    feed_frames(svc, 20)
    svc.close()
    # long enough that only the operator's rollback, not the deadline, ends this gate
    set_gate_limits(device, 600, GATE_MEMORY_MB)
    config = daemon_config(device, device.root / "ctl.sock")
    proc = subprocess.Popen(
        [*CLI, "run", "--config", str(config)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    installer: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: status(config).get("frames", 0) > 5, what="the daemon running")
        hang = device.package("1.2.0", 3, hanging_model())
        installer = subprocess.Popen(
            [*CLI, "install", str(hang), "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        gating = wait_for(
            lambda: (s := status(config)).get("ota", {}).get("state") == "GATING" and s,
            what="the candidate in the gate",
        )
        # inference goes on and status answers while the gate runs
        later = wait_for(
            lambda: (s := status(config))["frames"] > gating["frames"] + 10 and s,
            what="frames during the gate",
        )
        assert later["ota"]["state"] == "GATING" and later["pid"] == proc.pid
        # the OTA lock is free: a rollback goes through during the gate
        done = cli("rollback", "--config", config)
        assert done.returncode == 0, done.stderr
        assert "rolled back to digits 1.0.0 (from 1.1.0)" in done.stdout
        back = wait_for(lambda: (s := status(config))["model"]["version"] == "1.0.0" and s)
        # the hanging gate is still running; the install is dropped once it ends, so
        # stopping the daemon ends it: SIGTERM answers during a gate too
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        out, err = installer.communicate(timeout=60)
        assert installer.returncode != 0, out + err
        assert err.strip().startswith("Error: "), err
        assert back["frames"] > later["frames"]
    finally:
        for p in (proc, installer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert not any(is_gate_of(p, device.state_dir) for p in psutil.process_iter()), (
        "the gate child outlived the daemon"
    )
    svc = device.service()
    last = svc.journal.last()
    assert last is not None and last.state is OTAState.ROLLED_BACK, last
    assert svc.journal.refusal("digits", "1.2.0", "local") is None
    assert install.read_links(device.state_dir).current == "digits-1.0.0"
    svc.close()


INSTALL_IN_A_PROCESS = """
import sys
from pathlib import Path
from agent.config import AgentConfig, OTAConfig
from agent.ota.service import OTAService
cfg = AgentConfig(device_id="test-device-1", state_dir=Path(sys.argv[1]),
                  ota=OTAConfig(golden_dir=Path(sys.argv[2])))
OTAService(cfg).install_file(Path(sys.argv[3]))
"""


def test_a_gate_child_dies_with_the_agent_that_started_it(device: Device) -> None:
    """An agent SIGKILLed mid-gate (a power-cut-like crash) leaves no gate running."""
    install_v1(device)
    set_gate_limits(device, 600, GATE_MEMORY_MB)
    hang = device.package("1.1.0", 2, hanging_model())
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            INSTALL_IN_A_PROCESS,
            str(device.state_dir),
            str(device.config.ota.golden_dir),
            str(hang),
        ],
        cwd=REPO,
    )
    try:
        child = wait_for(
            lambda: next((p for p in psutil.Process(agent.pid).children() if is_gate_of(p)), None),
            what="the gate child",
        )
        wait_for(lambda: child.cpu_percent(0.2) > 0, what="the candidate spinning")
    finally:
        agent.kill()
        agent.wait(10)
    child.wait(60)  # psutil.TimeoutExpired if it outlived its parent
    assert not child.is_running()
    # the killed agent's finally never ran: its gate files stay until the next start
    staging = device.state_dir / "staging"
    assert any(p.name.startswith("gate-") for p in staging.iterdir())
    svc = device.service()
    svc.recover()
    assert [p.name for p in staging.iterdir() if p.name.startswith("gate-")] == []
    assert install.read_links(device.state_dir).current == "digits-1.0.0"
    svc.close()
