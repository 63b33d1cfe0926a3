"""`edge-agent status --watch` against a real daemon subprocess: piped, on a pty, Ctrl-C, head."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, "-m", "agent.cli"]
LINE = re.compile(
    r"^\S+Z state=running device=pi-7 fps=\S+ p95_ms=\S+ frames=\d+ errors=0 "
    r"backlog_rows=(\d+) cpu_pct=(\S+) rss_mb=(\d+\.\d)"
)


def wait_for(check: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _free_port() -> int:
    # A port nothing listens on: uploads fail fast with "connection refused".
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daemon(make_config: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real `edge-agent run` whose telemetry cannot upload (backlog and upload error)."""
    state = tmp_path / "st"
    state.mkdir()
    (state / "device_id").write_text("pi-7\n")
    config = make_config(
        telemetry={
            "enabled": True,
            "endpoint": f"http://127.0.0.1:{_free_port()}",
            "upload_interval_s": 0.2,
            "summary_interval_s": 0.5,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 0.5,
            "connect_timeout_s": 1.0,
        },
    )
    proc = subprocess.Popen(
        [*CLI, "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def running() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            snap = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(snap.get("state") == "running" and snap.get("frames", 0) > 0)

    try:
        wait_for(running, timeout_s=120, what="daemon running")
        yield config, state
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "status", *args], capture_output=True, text=True, timeout=180, check=False
    )


def test_piped_watch_prints_one_line_per_refresh(daemon: tuple[Path, Path]) -> None:
    _, state = daemon
    # The upload fails (nothing listens): wait until the store says so.
    wait_for(
        lambda: _upload_error(state),
        timeout_s=120,
        what="an upload error recorded",
    )
    out = _status("--watch", "--state-dir", str(state), "--count", "3", "--interval-s", "0.3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and "\x1b[" not in out.stdout, out.stdout
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert all(int(m.group(3).split(".")[0]) > 0 for m in matches if m), "RSS of the daemon"
    assert matches[0] and matches[0].group(2) == "-"  # CPU % needs two samples
    assert matches[-1] and float(matches[-1].group(2)) >= 0.0
    assert "upload_error=" in lines[-1]


def _upload_error(state: Path) -> bool:
    from agent.telemetry.status import telemetry_status

    return bool(telemetry_status(state / "telemetry.db").get("last_upload_error"))


def test_watch_on_a_terminal_redraws_in_place(daemon: tuple[Path, Path]) -> None:
    _, state = daemon
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [
            *CLI,
            "status",
            "--watch",
            "--state-dir",
            str(state),
            "--count",
            "2",
            "--interval-s",
            "0.2",
        ],
        stdout=follower,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the pty
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    text = b"".join(chunks).decode()
    assert text.count("\x1b[H\x1b[J") == 2, "each refresh clears and redraws"
    for label in ("state:", "model:", "device:     pi-7", "ota poll:", "telemetry:", "process:"):
        assert label in text, (label, text[-800:])
    assert re.search(r"process:    CPU [\d.]+ %, RSS [\d.]+ MB", text), text[-800:]


def test_ctrl_c_ends_the_watch_with_exit_0(daemon: tuple[Path, Path]) -> None:
    _, state = daemon
    proc = subprocess.Popen(
        [*CLI, "status", "--watch", "--state-dir", str(state), "--interval-s", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "state=running" in first
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def test_watch_into_head_exits_quietly(daemon: tuple[Path, Path]) -> None:
    _, state = daemon
    cmd = " ".join([*CLI, "status", "--watch", "--state-dir", str(state), "--interval-s", "0.1"])
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{cmd} | head -n 2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2 and out.stderr == ""


def test_broken_config_and_refused_reload_still_show_status(
    daemon: tuple[Path, Path], tmp_path: Path
) -> None:
    config, state = daemon
    good = config.read_text()
    config.write_text(good.replace("fps_cap: 20", "fps_cap: twenty"))
    pid = json.loads((state / "status.json").read_text())["pid"]
    os.kill(pid, signal.SIGHUP)  # the daemon refuses the bad config and keeps running

    def refused() -> bool:
        snap = json.loads((state / "status.json").read_text())
        return bool((snap.get("last_reload") or {}).get("ok") is False)

    wait_for(refused, timeout_s=60, what="reload refused")
    plain = _status("--config", str(config))
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr.startswith("warning: ") and "fps_cap" in plain.stderr
    assert "state:      running" in plain.stdout
    watched = _status("--watch", "--config", str(config), "--count", "1")
    assert watched.returncode == 0, watched.stderr
    assert "reload_refused=" in watched.stdout and "fps_cap" in watched.stdout


def test_watch_waits_for_a_missing_status_file(tmp_path: Path) -> None:
    out = _status("--watch", "--state-dir", str(tmp_path), "--count", "2", "--interval-s", "0.1")
    assert out.returncode == 0
    assert out.stdout.count("waiting:") == 2 and "no status file" in out.stdout
    plain = _status("--state-dir", str(tmp_path))
    assert plain.returncode == 3 and plain.stderr.startswith("Error: ")
