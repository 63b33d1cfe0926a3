"""`edge-agent install/rollback` while a daemon subprocess runs: handed over its control socket,
hot-swapped without a restart or a lost frame; `status --json` carries the OTA fields."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config
from agent.control import control_socket_path
from agent.ota.states import OTAState
from agent.telemetry.identity import resolve_device_id

from .conftest import GOLDEN, Device, broken_digits_model, feed_frames

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "agent.cli"]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=180, cwd=REPO
    )


def wait_for(check: Callable[[], Any], timeout_s: float = 60.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def daemon_config(dev: Device, sock: Path) -> Path:
    data = {
        "device_id": "test-device-1",
        "state_dir": str(dev.state_dir),
        "source": {"kind": "synthetic", "pattern": "digits"},
        "scheduler": {"fps_cap": 25},
        "governor": {"enabled": False},
        "sinks": [{"kind": "jsonl", "path": str(dev.root / "results.jsonl")}],
        "telemetry": {"enabled": False},
        # not under the state dir: the CLI must find it where the daemon put it
        "status": {"interval_s": 0.2, "control_socket": str(sock)},
        "ota": {
            "enabled": True,
            "golden_dir": str(dev.root / "golden"),
            "probation_frames": 20,
            "probation_s": 0.0,
            "reserve_free_bytes": 0,
        },
    }
    path = dev.root / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def running(device: Device) -> Iterator[tuple[Device, Path, subprocess.Popen[str]]]:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1))
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()
    config = daemon_config(device, device.root / "ctl.sock")
    proc = subprocess.Popen(
        [*CLI, "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield device, config, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def status(config: Path) -> dict[str, Any]:
    done = cli("status", "--config", config, "--json")
    return json.loads(done.stdout) if done.stdout.strip() else {}


def test_install_and_rollback_are_handed_to_the_running_daemon(
    running: tuple[Device, Path, subprocess.Popen[str]],
) -> None:
    dev, config, proc = running
    cfg = load_config(config)
    assert control_socket_path(cfg) == dev.root / "ctl.sock"
    first = wait_for(
        lambda: (s := status(config)).get("state") == "running" and s["frames"] > 5 and s,
        what="the daemon on 1.0.0",
    )
    assert first["model"]["version"] == "1.0.0" and first["ota"]["active_version"] == "1.0.0"
    assert (dev.root / "ctl.sock").exists() and not (dev.state_dir / "control.sock").exists()

    done = cli(
        "install", dev.package("1.1.0", 2, "digits_int8.onnx", precision="int8"), "--config", config
    )
    assert done.returncode == 0, done.stderr
    assert "installed digits 1.1.0; on probation" in done.stdout
    after = wait_for(
        lambda: (s := status(config))["ota"]["state"] == "COMMITTED" and s, what="commit"
    )
    assert after["pid"] == first["pid"] == proc.pid  # the same process: a hot swap
    assert after["model"]["version"] == "1.1.0" and after["frames"] > first["frames"]
    assert (after["ota"]["active_version"], after["ota"]["previous_version"]) == ("1.1.0", "1.0.0")
    assert after["ota"]["last_gate"]["passed"] is True

    bad = dev.package("1.2.0", 3, broken_digits_model())
    done = cli("install", bad, "--config", config)
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: digits 1.2.0: gate failed")
    refused = status(config)
    assert refused["model"]["version"] == "1.1.0"
    assert refused["ota"]["last_refusal_reason"].startswith("gate failed")
    assert refused["ota"]["last_gate"]["version"] == "1.2.0"
    assert refused["ota"]["last_gate"]["passed"] is False
    assert {c["name"] for c in refused["ota"]["last_gate"]["failed"]} >= {"accuracy"}
    table = cli("status", "--config", config).stdout
    assert "refused:    digits 1.2.0: gate failed" in table
    assert "last gate:  1.2.0 FAILED: accuracy" in table

    done = cli("rollback", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "rolled back to digits 1.0.0 (from 1.1.0)" in done.stdout
    back = wait_for(lambda: (s := status(config))["model"]["version"] == "1.0.0" and s)
    assert back["pid"] == proc.pid
    frames_then = back["frames"]
    wait_for(lambda: status(config)["frames"] > frames_then + 5, what="frames after rollback")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    rows = [json.loads(x) for x in (dev.root / "results.jsonl").read_text().splitlines()]
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(1, len(seqs) + 1)), "a frame was lost across the swaps"
    versions = [r["version"] for r in rows]
    changes = [b for a, b in itertools.pairwise(versions) if a != b]
    assert changes == ["1.1.0", "1.0.0"]


def test_daemon_and_ota_use_one_device_id(device: Device, tmp_path: Path) -> None:
    """Telemetry rows and rollout membership name the device alike: provisioned id first."""
    from agent.config import AgentConfig, GovernorConfig, ModelConfig, TelemetryConfig
    from agent.daemon import Daemon
    from agent.ota.service import OTAService

    cfg = AgentConfig(
        state_dir=device.state_dir,
        model=ModelConfig(path=GOLDEN.parent / "agent/demo/models/digits_fp32.onnx"),
        governor=GovernorConfig(enabled=False),
        telemetry=TelemetryConfig(enabled=True, db_path=tmp_path / "t.db"),
    )
    (device.state_dir / "device_id").write_text("pi-provisioned-7\n")
    daemon = Daemon(cfg)
    daemon._start_telemetry()
    try:
        assert daemon.telemetry.device_id == "pi-provisioned-7"
    finally:
        daemon.telemetry.close()
    service = OTAService(cfg)
    assert service.device_id() == "pi-provisioned-7" == resolve_device_id(None, device.state_dir)
    service.close()

    # Nothing provisioned: a hash of the machine id (never the raw id, never the hostname).
    (device.state_dir / "device_id").unlink()
    daemon = Daemon(cfg)
    daemon._start_telemetry()
    try:
        derived = daemon.telemetry.device_id
    finally:
        daemon.telemetry.close()
    service = OTAService(cfg)
    assert service.device_id() == derived
    service.close()
    import socket

    assert derived != socket.gethostname()
    machine_id = Path("/etc/machine-id")
    if machine_id.exists() and machine_id.read_text().strip():
        assert machine_id.read_text().strip() not in derived
