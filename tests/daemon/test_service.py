"""The daemon as systemd runs it: a real subprocess, sd_notify, SIGHUP/SIGTERM/SIGKILL, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.control import control_request

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_BOUND_S = 10.0


@pytest.fixture
def spawn(tmp_path: Path, helpers: Any) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(
        config: Path, notify: Path | None = None, runtime_dir: Path | None = None
    ) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("RUNTIME_DIRECTORY", None)
        if runtime_dir is not None:
            # what systemd sets for RuntimeDirectory=edge-agent
            env["RUNTIME_DIRECTORY"] = str(runtime_dir)
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify)
            env["WATCHDOG_USEC"] = "2000000"
        log = (tmp_path / f"daemon{len(procs)}.log").open("w")
        proc = subprocess.Popen(
            helpers.agent_cmd("run", "--config", str(config)),
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def status(tmp_path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((tmp_path / "st" / "status.json").read_text())
        return data
    except (FileNotFoundError, ValueError):
        return {}


def log_text(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob("daemon*.log")))


def test_notify_sighup_and_sigterm_on_a_real_process(
    make_config: Callable[..., Path],
    spawn: Any,
    notify_socket: Any,
    tmp_path: Path,
    helpers: Any,
) -> None:
    config = make_config(scheduler={"fps_cap": 25, "drain_timeout_s": 3.0})
    proc = spawn(config, notify=notify_socket.path)
    helpers.wait_for(lambda: notify_socket.seen("READY=1"), 60, "READY=1")
    helpers.wait_for(lambda: notify_socket.seen("WATCHDOG=1"), 10, "WATCHDOG=1")
    assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in notify_socket.drain())
    helpers.wait_for(lambda: status(tmp_path).get("frames", 0) > 10, 20, "frames")
    assert status(tmp_path)["fps_cap"] == 25

    # a good new config: the cap changes without a restart
    make_config(scheduler={"fps_cap": 9, "drain_timeout_s": 3.0})
    proc.send_signal(signal.SIGHUP)
    helpers.wait_for(lambda: status(tmp_path).get("fps_cap") == 9, 20, "reloaded cap")
    # a bad one is refused and the old one kept
    config.write_text("scheduler: {fps_cap: 5}\nsurprise: 1\n")
    proc.send_signal(signal.SIGHUP)
    helpers.wait_for(
        lambda: (status(tmp_path).get("last_reload") or {}).get("ok") is False, 20, "refused reload"
    )
    assert "surprise: unknown key" in status(tmp_path)["last_reload"]["error"]
    assert proc.poll() is None and status(tmp_path)["fps_cap"] == 9

    frames_before = status(tmp_path)["frames"]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_BOUND_S) == 0
    assert time.monotonic() - started < STOP_BOUND_S
    assert notify_socket.seen("STOPPING=1")
    final = status(tmp_path)
    assert final["state"] == "stopped" and final["frames"] >= frames_before
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == final["frames"]  # every counted frame was drained to the sink
    assert not (tmp_path / "st" / "control.sock").exists()
    assert "Traceback" not in log_text(tmp_path)


def test_sigkill_then_restart_recovers_the_socket(
    make_config: Callable[..., Path], spawn: Any, tmp_path: Path, helpers: Any
) -> None:
    config = make_config(scheduler={"fps_cap": 20})
    proc = spawn(config)
    sock = tmp_path / "st" / "control.sock"
    helpers.wait_for(lambda: status(tmp_path).get("frames", 0) > 3, 60, "first run")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert sock.exists()  # left behind by the killed process
    proc = spawn(config)
    helpers.wait_for(lambda: status(tmp_path).get("pid") == proc.pid, 60, "second run")
    reply = control_request(sock, {"cmd": "status"})
    assert reply["ok"] and reply["status"]["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_BOUND_S) == 0


def test_status_command_live_and_stopped(
    make_config: Callable[..., Path], spawn: Any, tmp_path: Path, helpers: Any
) -> None:
    config = make_config()
    cmd = helpers.agent_cmd("status", "--config", str(config))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 3 and done.stderr.startswith("Error: ")
    assert "no status file" in done.stderr and "Traceback" not in done.stderr
    proc = spawn(config)
    helpers.wait_for(lambda: status(tmp_path).get("frames", 0) > 3, 60, "frames")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "state:      running" in done.stdout and "fps:" in done.stdout
    assert "digits" in done.stdout and "p95" in done.stdout
    done = subprocess.run(
        helpers.agent_cmd("status", "--state-dir", str(tmp_path / "st"), "--json"),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert json.loads(done.stdout)["running"] is True
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_BOUND_S) == 0
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 3 and "not running" in done.stdout


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ("scheduler: [", "invalid YAML"),
        ("scheduler: {fps_cap: fast}", "scheduler.fps_cap: expected a number"),
        ("governor: {soft_limit_c: 90, hard_limit_c: 80}", "hard_limit_c"),
        ("sinks: [{kind: jsonl}]", "path: required for a jsonl sink"),
        ("source: {kind: directory}", "path: required for a directory source"),
        ("model: {path: /nonexistent/m.onnx}", "/nonexistent/m.onnx: model file not found"),
    ],
)
def test_bad_config_is_one_error_line_and_exit_2(
    tmp_path: Path, helpers: Any, config_text: str, message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'st'}\ntelemetry: {{enabled: false}}\n" + config_text + "\n"
    )
    done = subprocess.run(
        helpers.agent_cmd("run", "--config", str(config)),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_source_that_cannot_open_is_a_clear_error(
    tmp_path: Path, helpers: Any, digits_model: Path
) -> None:
    config = tmp_path / "a.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'st'}\ntelemetry: {{enabled: false}}\n"
        f"model: {{path: {digits_model}}}\n"
        f"source: {{kind: directory, path: {tmp_path / 'nope'}}}\n"
    )
    done = subprocess.run(
        helpers.agent_cmd("run", "--config", str(config)),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert done.returncode == 1 and "nope: source directory not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_has_examples(helpers: Any) -> None:
    for command in ("run", "status"):
        done = subprocess.run(
            helpers.agent_cmd(command, "--help"), capture_output=True, text=True, cwd=REPO_ROOT
        )
        assert done.returncode == 0 and "example:\n  edge-agent " + command in done.stdout


def test_systemd_unit_verifies(helpers: Any, tmp_path: Path) -> None:
    unit = REPO_ROOT / "systemd" / "edge-agent.service"
    text = unit.read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StartLimitBurst=",
        "StateDirectory=edge-agent",
        "ConfigurationDirectory=edge-agent",
        "SupplementaryGroups=video",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ):
        assert directive in text, directive
    analyze = helpers.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify needs the ExecStart binary to exist: point it at a stand-in on this machine
    fake_bin = tmp_path / "edge-agent"
    fake_bin.write_text("#!/bin/sh\n")
    fake_bin.chmod(0o755)
    copy = tmp_path / "edge-agent.service"
    copy.write_text(text.replace("/usr/bin/edge-agent", str(fake_bin)))
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    problems = [
        x for x in done.stderr.splitlines() if "edge-agent.service" in x and "Failed to" not in x
    ]
    assert done.returncode == 0 or not problems, done.stderr
    assert not problems, done.stderr


def test_status_on_the_runtime_dir_is_read_through_the_state_dir(
    make_config: Callable[..., Path], spawn: Any, tmp_path: Path, helpers: Any
) -> None:
    # Under systemd (RuntimeDirectory=) the status file lives on tmpfs and
    # state_dir/status.json links to it: the CLI and other readers keep one path.
    config = make_config()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "st").mkdir(exist_ok=True)
    # a regular file from an earlier run outside systemd gives way to the link
    (tmp_path / "st" / "status.json").write_text('{"state": "stopped"}\n')
    proc = spawn(config, runtime_dir=run_dir)
    helpers.wait_for(lambda: status(tmp_path).get("frames", 0) > 3, 60, "frames")
    link = tmp_path / "st" / "status.json"
    assert link.is_symlink() and link.resolve() == (run_dir / "status.json").resolve()
    assert (run_dir / "status.json").is_file() and not (run_dir / "status.json").is_symlink()
    cmd = helpers.agent_cmd("status", "--state-dir", str(tmp_path / "st"), "--json")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_BOUND_S) == 0
    assert status(tmp_path)["state"] == "stopped"
    # the tmpfs is gone after a reboot: the dangling link reads as "no status file"
    (run_dir / "status.json").unlink()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 3 and "no status file" in done.stderr
