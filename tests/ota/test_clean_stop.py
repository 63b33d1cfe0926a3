"""Restarts are not crashes: a SIGTERM in DOWNLOADING or GATING, again and again, never trips
the crash-loop breaker nor refuses the release; a SIGKILL in PROBATION still does."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.ota import install
from agent.ota.journal import Journal
from agent.ota.states import AT_REST, OTAState

from .conftest import Device, feed_frames, make_device, publish_release, repo_device
from .fault_models import hanging_model
from .test_daemon_link import CLI, REPO, daemon_config, wait_for

ROUNDS = 4  # one more than the default crash_loop_limit (3)


def journal_state(dev: Device) -> OTAState | None:
    journal = Journal(dev.state_dir / "state.db")
    try:
        last = journal.last()
        return last.state if last is not None else None
    finally:
        journal.close()


def write_config(dev: Device, **ota: Any) -> Path:
    path = daemon_config(dev, dev.root / "ctl.sock")
    data = yaml.safe_load(path.read_text())
    data["ota"].update(ota)
    path.write_text(yaml.safe_dump(data))
    return path


def start_daemon(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed_v1(dev: Device) -> None:
    svc = dev.service()
    svc.install_file(dev.package("1.0.0", 1))
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()


# ------------------------------------------------------------------ the ways into a state


def into_downloading(tmp: Path, http: tuple[str, Path, dict[str, Any]]) -> Callable[[], Any]:
    """A repository whose package trickles in (the server drips bytes): the daemon's first
    poll sits in DOWNLOADING."""
    url, www, faults = http
    dev = repo_device(tmp, url, www)
    committed_v1(dev)
    publish_release(dev, www, "1.1.0", 2)
    faults["targets"] = "drip"
    config = write_config(dev, repository_url=url, poll_interval_s=3600, poll_jitter_s=0)

    def one_round() -> tuple[Device, subprocess.Popen[str]]:
        proc = start_daemon(config)
        wait_for(lambda: journal_state(dev) is OTAState.DOWNLOADING, what="DOWNLOADING")
        return dev, proc

    return one_round


def into_gating(tmp: Path, _http: Any) -> Callable[[], Any]:
    """An operator installs a candidate that hangs in the gate."""
    dev = make_device(tmp / "gating")
    committed_v1(dev)
    config = write_config(dev)
    hang = dev.package("1.1.0", 2, hanging_model())

    def one_round() -> tuple[Device, subprocess.Popen[str]]:
        proc = start_daemon(config)
        wait_for(lambda: (dev.root / "ctl.sock").exists(), what="the control socket")
        subprocess.Popen(
            [*CLI, "install", str(hang), "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: journal_state(dev) is OTAState.GATING, what="GATING")
        return dev, proc

    return one_round


def into_probation(tmp: Path, _http: Any) -> Callable[[], Any]:
    """A new model on probation that the daemon keeps watching (many frames to go)."""
    dev = make_device(tmp / "probation")
    committed_v1(dev)
    svc = dev.service()
    svc.install_file(dev.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    svc.close()
    config = write_config(dev, probation_frames=10**9)

    def one_round() -> tuple[Device, subprocess.Popen[str]]:
        proc = start_daemon(config)
        # this very process is running (a SIGKILLed one leaves its socket file behind)
        wait_for(lambda: running_pid(dev) == proc.pid, what="the daemon running")
        return dev, proc

    return one_round


def running_pid(dev: Device) -> int | None:
    try:
        data = json.loads((dev.state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return int(data["pid"]) if data.get("state") == "running" else None


@dataclasses.dataclass(frozen=True)
class StopRow:
    """The fault: which signal ends the agent, in which state, ROUNDS times in a row."""

    id: str
    reach: Callable[[Path, Any], Callable[[], Any]]
    signum: signal.Signals
    breaker_trips: bool


ROWS = [
    StopRow("sigterm-in-downloading", into_downloading, signal.SIGTERM, False),
    StopRow("sigterm-in-gating", into_gating, signal.SIGTERM, False),
    StopRow("sigkill-in-probation", into_probation, signal.SIGKILL, True),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_only_crashes_in_probation_count_toward_the_breaker(
    row: StopRow, tmp_path: Path, http_dir: tuple[str, Path, dict[str, Any]]
) -> None:
    one_round = row.reach(tmp_path, http_dir)
    dev: Device | None = None
    for _ in range(ROUNDS):
        dev, proc = one_round()
        try:
            proc.send_signal(row.signum)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        log = proc.stderr.read() if proc.stderr else ""
        if row.signum is signal.SIGTERM:
            assert code == 0, log
            # the stop brought the step to rest before the process ended
            assert journal_state(dev) in AT_REST, log
        else:
            assert code == -signal.SIGKILL
    assert dev is not None
    svc = dev.service()
    svc.recover()
    last = svc.journal.last()
    assert last is not None
    refusal = svc.journal.refusal("digits", "1.1.0", "local") or svc.journal.last_refusal()
    if row.breaker_trips:
        assert last.state is OTAState.ROLLED_BACK and "crash loop" in last.reason, last
        assert install.read_links(dev.state_dir).current == "digits-1.0.0"
        assert refusal is not None
    else:
        assert last.state is OTAState.IDLE, last
        assert refusal is None, refusal
        assert svc.journal.get_value("attempts:digits-1.1.0") is None
        assert install.read_links(dev.state_dir).current == "digits-1.0.0"
    svc.close()
