"""Local install through the real package reader and gate: accept, refuse, probation, rollback."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agent.commands.ota import ota_status
from agent.errors import (
    CompatibilityError,
    DowngradeError,
    GateFailedError,
    PackageError,
    StateError,
)
from agent.ota import install
from agent.ota.service import OTAService
from agent.ota.states import OTAState

from .conftest import Device, broken_digits_model, feed_frames, make_key_dir, release_floor


def _install_v1(device: Device) -> None:
    svc = device.service()
    entry = svc.install_file(device.package("1.0.0", 1))
    assert entry.state is OTAState.PROBATION
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    svc.close()


def test_first_install_then_gated_upgrade_commits(device: Device) -> None:
    _install_v1(device)
    svc = device.service()
    entry = svc.install_file(device.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    assert entry.state is OTAState.PROBATION
    links = install.read_links(device.state_dir)
    assert links == install.Links("digits-1.1.0", "digits-1.0.0")
    report = json.loads(svc.journal.get_value("last_gate_report") or "{}")
    assert report["version"] == "1.1.0" and report["passed"] is True
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    assert release_floor(device) == 2
    # A replayed older package is refused by the floor.
    with pytest.raises(DowngradeError):
        svc.install_file(device.package("1.0.1", 1))
    assert svc.journal.state() is OTAState.REJECTED
    assert install.read_links(device.state_dir).current == "digits-1.1.0"


def test_gate_failure_is_refused_and_recorded(device: Device) -> None:
    _install_v1(device)
    svc = device.service()
    with pytest.raises(GateFailedError, match="gate failed"):
        svc.install_file(device.package("1.2.0", 3, broken_digits_model()))
    last = svc.journal.last()
    assert last is not None and last.state is OTAState.REJECTED and last.version == "1.2.0"
    assert svc.journal.refusal("digits", "1.2.0", "local") is not None
    assert install.read_links(device.state_dir).current == "digits-1.0.0"
    assert not (device.state_dir / "models" / "digits-1.2.0").exists()
    assert not any((device.state_dir / "staging").iterdir())


def test_wrong_key_package_is_refused_before_anything_is_written(device: Device) -> None:
    _install_v1(device)
    stranger = make_key_dir(device.root / "stranger")
    svc = device.service()
    bad = device.package("1.1.0", 2, keys=[k for k in stranger if k.role == "release"])
    with pytest.raises(PackageError):
        svc.install_file(bad)
    assert svc.journal.state() is OTAState.REJECTED
    assert install.read_links(device.state_dir).current == "digits-1.0.0"


def test_model_that_fails_to_load_leaves_old_model(device: Device) -> None:
    _install_v1(device)
    svc = device.service(
        gate=lambda b, c, m: __import__("agent.ota.service").ota.service.GateOutcome(
            True, {}, "forced"
        )
    )
    with pytest.raises(Exception):  # noqa: B017 - the reader or the loader refuses it
        svc.install_file(device.package("1.1.0", 2, b"\x08\x01garbage-not-onnx" * 10))
    assert svc.journal.state() in (OTAState.REJECTED, OTAState.ROLLED_BACK)
    assert install.read_links(device.state_dir).current == "digits-1.0.0"


def test_probation_failure_rolls_back_and_refuses(device: Device) -> None:
    _install_v1(device)
    svc = device.service()
    svc.install_file(device.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    for _ in range(10):  # the new model errors on every frame
        svc.observe_frame(0.001, None, error=True)
    last = svc.journal.last()
    assert last is not None and last.state is OTAState.ROLLED_BACK
    assert "probation failed" in last.reason
    assert install.read_links(device.state_dir).current == "digits-1.0.0"
    assert svc.journal.refusal("digits", "1.1.0", "local") is not None
    assert release_floor(device) == 1


def test_crash_loop_in_probation_rolls_back(device: Device) -> None:
    _install_v1(device)
    svc = device.service()
    svc.install_file(device.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    svc.close()
    outcomes = []
    for _ in range(device.config.ota.crash_loop_limit):
        s = device.service()  # each start is a restart of the agent
        outcomes.append(s.recover())
        s.close()
    assert outcomes[-1] == "rolled back (crash loop)"
    assert outcomes[:-1] == ["probation continues"] * (len(outcomes) - 1)
    assert install.read_links(device.state_dir).current == "digits-1.0.0"


def test_operator_rollback_and_no_previous(device: Device) -> None:
    svc = device.service()
    with pytest.raises(StateError, match="no previous model"):
        svc.rollback()
    _install_v1(device)
    svc.install_file(device.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    feed_frames(svc, 20)
    entry = svc.rollback()
    # As the fleet reads it: version is the release left, from_version the one running.
    assert entry.state is OTAState.ROLLED_BACK
    assert (entry.version, entry.from_version) == ("1.1.0", "1.0.0")
    assert install.read_links(device.state_dir) == install.Links("digits-1.0.0", "digits-1.1.0")


def test_hot_swap_replaces_slot_model(device: Device) -> None:
    from agent.pipeline.slot import ModelSlot

    _install_v1(device)
    slot = ModelSlot()
    svc = device.service(slot=slot)
    svc.install_file(device.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    live = slot.current()
    assert (live.name, live.version) == ("digits", "1.1.0")
    assert live.backend.run(live.backend.zeros(1))[0].shape == (1, 10)
    svc.rollback()
    assert slot.current().version == "1.0.0" and slot.swaps == 2


def test_extraction_failure_on_disk_full_keeps_old_model(device: Device, tmp_path: Path) -> None:
    import errno

    _install_v1(device)

    def full_disk_reader(tar: Path, keyring: Path, staging: Path, check_manifest: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    svc = device.service(read_package=full_disk_reader)
    with pytest.raises(Exception, match="No space left"):
        svc.install_file(device.package("1.1.0", 2))
    assert svc.journal.state() is OTAState.IDLE
    assert install.read_links(device.state_dir).current == "digits-1.0.0"


def test_incompatible_package_is_refused_before_extraction(device: Device) -> None:
    _install_v1(device)
    svc = device.service()
    cases = [
        ({"min_agent_version": "99.0.0"}, "needs edge-agent >= 99.0.0"),
        ({"hardware_classes": ["jetson-orin"]}, "hardware class jetson-orin"),
        ({"runtime_features": ["tensorrt"]}, "runtime feature 'tensorrt'"),
    ]
    for i, (compat, reason) in enumerate(cases):
        spec = {"min_agent_version": "0.1.0", "hardware_classes": [], "runtime_features": []}
        version = f"1.1.{i}"
        with pytest.raises(CompatibilityError, match=reason):
            svc.install_file(device.package(version, 2, compat={**spec, **compat}))
        last = svc.journal.last()
        assert last is not None and last.state is OTAState.REJECTED
        assert last.version == version and reason in last.reason
        assert reason in (svc.journal.refusal("digits", version, "local") or "")
        assert not (device.state_dir / "models" / f"digits-{version}").exists()
        assert not any((device.state_dir / "staging").iterdir())
    assert install.read_links(device.state_dir).current == "digits-1.0.0"
    svc.close()
    # The same hardware-bound package fits a device of that class.
    config = dataclasses.replace(
        device.config,
        ota=dataclasses.replace(device.config.ota, hardware_class="jetson-orin"),
    )
    svc = OTAService(config)
    spec = {"min_agent_version": "0.1.0", "hardware_classes": ["jetson-orin"]}
    entry = svc.install_file(device.package("1.1.9", 2, compat={**spec, "runtime_features": []}))
    assert entry.state is OTAState.PROBATION and entry.version == "1.1.9"


def test_release_floor_is_the_package_areas_and_old_marks_migrate(device: Device) -> None:
    _install_v1(device)
    assert release_floor(device) == 1
    svc = device.service()
    # An older agent kept the floor as a journal mark; the next start moves it over.
    svc.journal.raise_mark("release.digits", 5)
    svc.close()
    svc = device.service()
    assert release_floor(device) == 5 and svc.journal.marks("release.") == {}
    with pytest.raises(DowngradeError, match="below this device's floor 5"):
        svc.install_file(device.package("1.1.0", 4))
    with pytest.raises(DowngradeError, match="not above the floor 5"):
        svc.install_file(device.package("1.1.1", 5))
    assert svc.install_file(device.package("1.2.0", 6)).state is OTAState.PROBATION
    feed_frames(svc, 20)
    assert release_floor(device) == 6
    status = ota_status(device.state_dir)
    assert status["release_floor"] == 6 and status["active_version"] == "1.2.0"


def test_kill_after_commit_row_still_raises_floor_on_restart(device: Device) -> None:
    _install_v1(device)
    svc = device.service()
    svc.install_file(device.package("1.1.0", 2, "digits_int8.onnx", precision="int8"))
    # The COMMITTED row is saved but the process dies before the floor moves.
    svc._enter(OTAState.COMMITTED, reason="probation passed", detail={"release_counter": 2})
    svc.close()
    assert release_floor(device) == 1
    restarted = device.service()
    restarted.recover()
    assert release_floor(device) == 2
    assert sorted(p.name for p in (device.state_dir / "models").iterdir()) == [
        "digits-1.0.0",
        "digits-1.1.0",
    ]
