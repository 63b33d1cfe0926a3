"""The CLI on real subprocesses: exit codes per case, one writer per state dir (the lock and
the control socket), a daemon that starts on corrupt state files."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.ota.states import OTAState
from agent.statelock import lock_holder

from .conftest import Device, feed_frames, make_device, publish_release, repo_device

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "agent.cli"]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def write_config(dev: Device, **extra: Any) -> Path:
    ota = dev.config.ota
    data: dict[str, Any] = {
        "device_id": "test-device-1",
        "state_dir": str(dev.state_dir),
        "source": {"kind": "synthetic", "pattern": "digits"},
        "scheduler": {"fps_cap": 25},
        "governor": {"enabled": False},
        "telemetry": {"enabled": False},
        "ota": {
            "enabled": True,
            "repository_url": ota.repository_url,
            "golden_dir": str(ota.golden_dir),
            "probation_frames": 20,
            "probation_s": 0.0,
            "reserve_free_bytes": 0,
            "poll_interval_s": 3600.0,
            "poll_jitter_s": 0.0,
        },
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = dev.root / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def committed(dev: Device, counter: int = 1, version: str = "1.0.0") -> None:
    svc = dev.service()
    svc.install_file(dev.package(version, counter))
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()


@dataclasses.dataclass
class Held:
    """Something a row keeps alive while the command runs (a lock holder, a bound port)."""

    stop: Callable[[], None] = lambda: None


# ------------------------------------------------------------------ setups: (dev) -> argv


def rollback_without_previous(dev: Device, held: Held) -> list[Any]:
    committed(dev)
    return ["rollback", "--config", write_config(dev)]


def install_ending_committed(dev: Device, held: Held) -> list[Any]:
    return ["install", dev.package("1.0.0", 1), "--config", write_config(dev)]


def _no_golden_inputs(dev: Device) -> Path:
    # probation cannot run offline without golden inputs: it stays for the daemon
    (dev.root / "golden" / "inputs.npy").unlink()
    return write_config(dev)


def install_ending_in_probation(dev: Device, held: Held) -> list[Any]:
    return ["install", dev.package("1.0.0", 1), "--config", _no_golden_inputs(dev)]


def install_during_probation(dev: Device, held: Held) -> list[Any]:
    config = _no_golden_inputs(dev)
    svc = dev.service()
    svc.install_file(dev.package("1.0.0", 1))
    assert svc.journal.state() is OTAState.PROBATION
    svc.close()
    return ["install", dev.package("1.1.0", 2), "--config", config]


def install_missing_file(dev: Device, held: Held) -> list[Any]:
    return ["install", dev.root / "nope.tar", "--config", write_config(dev)]


def check_without_repository(dev: Device, held: Held) -> list[Any]:
    return ["update", "--check", "--config", write_config(dev)]


def locked_without_daemon(dev: Device, held: Held) -> list[Any]:
    committed(dev)
    committed(dev, 2, "1.1.0")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from agent.statelock import "
            "StateDirLock; lock = StateDirLock(Path(sys.argv[1])).acquire(); print('held', "
            "flush=True); time.sleep(600)",
            str(dev.state_dir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    held.stop = lambda: (holder.kill(), holder.wait(10))  # type: ignore[func-returns-value]
    return ["rollback", "--config", write_config(dev)]


def serve_on_a_used_port(dev: Device, held: Held) -> list[Any]:
    from agent.fleet.repo import init_repo

    init_repo(dev.root / "www", dev.keys)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    held.stop = busy.close
    port = busy.getsockname()[1]
    return ["serve", "--repo", dev.root / "www", "--port", port, "--db", dev.root / "fleet.db"]


@dataclasses.dataclass(frozen=True)
class CliCase:
    id: str
    setup: Callable[[Device, Held], list[Any]]  # the state the user is in, and the command
    exit_code: int
    says: str  # in the one Error: line (or stdout when it succeeds)
    state_after: str | None = None  # the journal's state when it matters


CASES = [
    CliCase("rollback-no-previous", rollback_without_previous, 3, "no previous model", "COMMITTED"),
    CliCase("install-ends-committed", install_ending_committed, 0, "state COMMITTED", "COMMITTED"),
    CliCase(
        "install-ends-probation", install_ending_in_probation, 0, "state PROBATION", "PROBATION"
    ),
    CliCase(
        "install-during-probation", install_during_probation, 3, "is on probation", "PROBATION"
    ),
    CliCase("install-missing-file", install_missing_file, 2, "file not found"),
    CliCase("check-without-repository", check_without_repository, 2, "ota.repository_url"),
    CliCase("locked-no-daemon", locked_without_daemon, 3, "no daemon answers", "COMMITTED"),
    CliCase("serve-port-in-use", serve_on_a_used_port, 2, "cannot listen there"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_exit_codes(case: CliCase, tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    held = Held()
    try:
        argv = case.setup(dev, held)
        done = cli(*argv)
    finally:
        held.stop()
    assert done.returncode == case.exit_code, (done.stdout, done.stderr)
    if case.exit_code == 0:
        assert case.says in done.stdout, done.stdout
    else:
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and case.says in errors[0], done.stderr
        assert "Traceback" not in done.stderr
    if case.state_after is not None:
        svc = dev.service()
        try:
            assert svc.journal.state().value == case.state_after
        finally:
            svc.close()


# ------------------------------------------------------------------ a daemon is the one writer


def wait_for(check: Callable[[], Any], timeout_s: float = 120.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def repo(tmp_path: Path, http_dir: tuple[str, Path, dict[str, Any]]) -> Iterator[Device]:
    url, www, _ = http_dir
    dev = repo_device(tmp_path, url, www)
    committed(dev)
    publish_release(dev, www, "1.0.0", 1)
    yield dev


def test_a_daemon_on_corrupt_state_files_runs_and_is_the_one_writer(repo: Device) -> None:
    dev = repo
    (dev.state_dir / "state.db").write_bytes(os.urandom(8192))
    telemetry_db = dev.root / "telemetry.db"
    telemetry_db.write_bytes(os.urandom(8192))
    config = write_config(
        dev,
        telemetry={"enabled": True, "db_path": str(telemetry_db)},
        sinks=[{"kind": "jsonl", "path": str(dev.root / "results.jsonl")}],
        status={"interval_s": 0.2},
    )
    proc = subprocess.Popen(
        [*CLI, "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def status() -> dict[str, Any]:
            done = cli("status", "--config", config, "--json")
            return json.loads(done.stdout) if done.stdout.strip() else {}

        first = wait_for(
            lambda: (s := status()).get("state") == "running" and s.get("frames", 0) > 5 and s,
            what="the daemon running on rebuilt state",
        )
        assert first["model"]["version"] == "1.0.0"
        ota = first["ota"]
        assert ota["active"]["state"] == "COMMITTED" and "rebuilt" in ota["active"]["reason"]
        assert ota["release_floor"] == 1
        assert list(dev.state_dir.glob("state.db.corrupt-*"))
        assert list(dev.root.glob("telemetry.db.corrupt-*"))
        assert lock_holder(dev.state_dir) == proc.pid
        # Through the control socket: with the lock held, the direct path would refuse.
        done = cli("update", "--check", "--config", config)
        assert done.returncode == 0 and "up to date" in done.stdout, done.stderr
        wait_for(lambda: status()["ota"]["last_check"], what="the last check in status")
        done = cli("rollback", "--config", config)
        assert done.returncode == 3, done.stderr
        assert done.stderr.startswith("Error: ") and "no previous model" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rows = (dev.root / "results.jsonl").read_text().splitlines()
    assert len(rows) > 5
    assert lock_holder(dev.state_dir) is None
