"""SIGKILL at every named point of a full update cycle; a restarted agent runs a verified model."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.ota import install
from agent.ota.killpoint import KILL_AT_ENV, KILL_TRACE_ENV, reset_kill_counts
from agent.ota.states import AT_REST, OTAState
from agent.package.keys import Keyring
from agent.package.reader import load_installed

from .conftest import Device, broken_digits_model, feed_frames, in_process_gate, make_device


def full_cycle(dev: Device, packages: dict[str, Path]) -> None:
    """Restart, install a good release through probation, refuse a bad one, roll back."""
    # the gate's code in-process: a child per gate would multiply this test's minutes
    svc = dev.service(gate=in_process_gate(dev))
    svc.recover()
    svc.resume_probation()
    if svc.journal.state() is OTAState.PROBATION:
        feed_frames(svc, 20)
    if install.read_links(dev.state_dir).current != "digits-1.1.0":
        with contextlib.suppress(Exception):
            svc.install_file(packages["good"])
        feed_frames(svc, 20)
    with contextlib.suppress(Exception):
        svc.install_file(packages["bad"])
    if install.read_links(dev.state_dir).current == "digits-1.1.0":
        svc.rollback()
    with contextlib.suppress(Exception):
        svc.install_file(packages["good2"])
    feed_frames(svc, 20)
    svc.close()


def _run_child(dev: Device, packages: dict[str, Path], env: dict[str, str]) -> int:
    pid = os.fork()
    if pid == 0:  # the child: one agent process, maybe killed at a point
        code = 0
        try:
            reset_kill_counts()
            os.environ.update(env)
            full_cycle(dev, packages)
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def check_consistent(dev: Device) -> str:
    """What a restarted agent sees: recovery runs, the journal is at rest or on probation,
    and the current link names a verified package whose model runs."""
    svc = dev.service()
    svc.recover()
    last = svc.journal.last()
    assert last is not None
    assert last.state in AT_REST or last.state is OTAState.PROBATION, last
    pkg_dir = install.resolve(dev.state_dir, "current")
    assert pkg_dir is not None, "current link missing or dangling"
    load_installed(pkg_dir, Keyring.load(dev.state_dir / "keyring"), check_files=True)
    manifest: Any = __import__("json").loads((pkg_dir / "manifest.json").read_bytes())
    if last.state is OTAState.PROBATION:
        assert manifest["version"] == last.version
    backend = svc.load_model(pkg_dir, manifest)
    out = backend.run(np.zeros((1, 1, 8, 8), np.float32))[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()
    svc.close()
    return str(manifest["version"])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Device, dict[str, Path]]:
    dev = make_device(tmp_path_factory.mktemp("kill"))
    svc = dev.service()
    svc.install_file(dev.package("1.0.0", 1))
    feed_frames(svc, 20)
    svc.close()
    packages = {
        "good": dev.package("1.1.0", 2, "digits_int8.onnx", precision="int8"),
        "bad": dev.package("1.2.0", 3, broken_digits_model()),
        "good2": dev.package("1.3.0", 4),
    }
    return dev, packages


def _fresh_copy(dev: Device, where: Path) -> Device:
    shutil.copytree(dev.state_dir, where / "state", symlinks=True)
    cfg = dev.config.__class__(**{**dev.config.__dict__, "state_dir": where / "state"})
    return Device(where, where / "state", dev.keys, cfg, dev.packages)


# ~240 forked update cycles: over the default 300 s when 2 shared cores are busy
@pytest.mark.timeout(900)
def test_sigkill_at_every_point_leaves_a_verified_model(
    template: tuple[Device, dict[str, Path]], tmp_path: Path
) -> None:
    dev, packages = template
    trace = tmp_path / "trace.txt"
    traced = _fresh_copy(dev, tmp_path / "trace")
    status = _run_child(traced, packages, {KILL_TRACE_ENV: str(trace)})
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    points = trace.read_text().split()
    assert len(points) >= 100, f"only {len(points)} kill points"
    assert check_consistent(traced) == "1.3.0"
    versions: dict[str, int] = {}
    for i, point in enumerate(points):
        run = _fresh_copy(dev, tmp_path / f"k{i}")
        status = _run_child(run, packages, {KILL_AT_ENV: point})
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, point
        version = check_consistent(run)
        versions[version] = versions.get(version, 0) + 1
        # The agent carries on from there: a clean cycle still ends consistent.
        _run_child(run, packages, {})
        check_consistent(run)
        shutil.rmtree(tmp_path / f"k{i}")
    assert set(versions) <= {"1.0.0", "1.1.0", "1.3.0"}
    assert len(versions) == 3  # kills landed before and after each switch
