"""The OTA gate keeps the current model's golden-set run in state_dir/gate-cache and reuses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.errors import GateFailedError
from agent.ota.service import OTAService
from agent.ota.states import OTAState

from .conftest import Device, broken_digits_model, feed_frames


def _last_gate(svc: OTAService) -> dict[str, Any]:
    entry = json.loads(svc.journal.get_value("last_gate_report") or "{}")
    report = entry["report"]
    assert isinstance(report, dict)
    return report


def _cache_entries(state_dir: Path) -> set[str]:
    root = state_dir / "gate-cache"
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if (p / "meta.json").is_file()}


def test_second_gate_with_the_same_current_model_reuses_the_cache(device: Device) -> None:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1))  # first install: nothing to gate against
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED
    assert _cache_entries(device.state_dir) == set()

    # Gate 1 against current 1.0.0: nothing cached yet, so 1.0.0 runs beside the candidate.
    with pytest.raises(GateFailedError):
        svc.install_file(device.package("1.1.0", 2, broken_digits_model()))
    first = _last_gate(svc)
    assert first["baseline_cache"]["used"] is False
    assert first["baseline_cache"]["path"] == str(device.state_dir / "gate-cache")
    assert sorted(first["baseline_cache"]["stored"]) == ["baseline", "candidate"]
    assert first["metrics"]["latency"]["baseline_from_cache"] is False
    assert len(_cache_entries(device.state_dir)) == 2

    # Gate 2, same current model: its outputs and latencies come from the cache, and the
    # verdict and metrics are the ones a fresh run of 1.0.0 gives.
    entry = svc.install_file(device.package("1.2.0", 3, "digits_int8.onnx", precision="int8"))
    assert entry.state is OTAState.PROBATION
    second = _last_gate(svc)
    assert second["passed"] is True
    assert second["baseline_cache"]["used"] is True
    assert second["baseline_cache"]["stored"] == ["candidate"]
    assert second["metrics"]["latency"]["baseline_from_cache"] is True
    assert second["metrics"]["latency"]["baseline"] == first["metrics"]["latency"]["baseline"]
    assert second["metrics"]["baseline"]["accuracy"] == first["metrics"]["baseline"]["accuracy"]
    assert second["models"]["baseline"]["sha256"] == first["models"]["baseline"]["sha256"]
    feed_frames(svc, 20)
    assert svc.journal.state() is OTAState.COMMITTED

    # Gate 3 against the new current model (1.2.0): it was stored as gate 2's candidate,
    # so it is not rerun either.
    with pytest.raises(GateFailedError):
        svc.install_file(device.package("1.3.0", 4, broken_digits_model(seed=1)))
    third = _last_gate(svc)
    assert third["baseline_cache"]["used"] is True
    assert third["models"]["baseline"]["sha256"] == second["models"]["candidate"]["sha256"]
    assert third["metrics"]["latency"]["baseline"] == second["metrics"]["latency"]["candidate"]
    svc.close()
