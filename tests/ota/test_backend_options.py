"""Every OTA model load (gate, activation, hot swap, rollback) uses config.model's backend
options, the same as the daemon's own start-up load."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.config import GovernorConfig, ModelConfig, SourceConfig, StatusConfig, TelemetryConfig
from agent.daemon import Daemon, package_backend_name
from agent.errors import ModelError
from agent.ota.states import OTAState
from agent.runtime.base import Backend

from .conftest import Device, feed_frames

THREADS = 2
PROVIDERS = ("CPUExecutionProvider",)


def configured(device: Device) -> Any:
    return dataclasses.replace(
        device.config,
        model=ModelConfig(intra_op_threads=THREADS, providers=PROVIDERS, warmup_runs=1),
        source=SourceConfig(kind="synthetic", pattern="digits"),
        governor=GovernorConfig(enabled=False),
        telemetry=TelemetryConfig(enabled=False),
        status=StatusConfig(interval_s=60.0),
        sinks=(),
    )


def options_of(backend: Backend) -> tuple[int, list[str]]:
    info = backend.describe()
    return info["intra_op_threads"], list(info["providers"])


def test_installed_hot_swapped_and_rolled_back_models_get_the_configured_options(
    device: Device,
) -> None:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1))
    feed_frames(svc, 20)
    svc.close()
    daemon = Daemon(configured(device))
    daemon.start()
    try:
        # the start-up load of the installed package
        assert daemon.slot.current().version == "1.0.0"
        assert options_of(daemon.slot.current().backend) == (THREADS, list(PROVIDERS))
        service = daemon._ota.service
        loads: list[tuple[str, tuple[int, list[str]]]] = []
        real_load = service.load_model

        def recording_load(package_dir: Path, manifest: Mapping[str, Any]) -> Backend:
            backend = real_load(package_dir, manifest)
            loads.append((str(manifest["version"]), options_of(backend)))
            return backend

        service.load_model = recording_load
        entry = service.install_file(
            device.package("1.1.0", 2, "digits_int8.onnx", precision="int8")
        )
        assert entry.state is OTAState.PROBATION
        live = daemon.slot.current()
        assert live.version == "1.1.0"
        assert options_of(live.backend) == (THREADS, list(PROVIDERS))
        # the gate loaded the current model and the candidate in its child process (its
        # report says with which options), then activation loaded the candidate here (and
        # the probation shadow loads the old model beside it on its own thread)
        assert [v for v, _ in loads if v == "1.1.0"] == ["1.1.0"]
        assert {v for v, _ in loads} <= {"1.1.0", "1.0.0"}
        assert all(opts == (THREADS, list(PROVIDERS)) for _, opts in loads), loads
        report = json.loads(service.journal.get_value("last_gate_report") or "{}")
        models = report["report"]["models"]
        assert (models["candidate"]["label"], models["baseline"]["label"]) == (
            "digits-1.1.0",
            "digits-1.0.0",
        )
        for role in ("baseline", "candidate"):
            opts = models[role]["options"]
            assert (opts["intra_op_threads"], opts["providers"]) == (THREADS, list(PROVIDERS))

        loads.clear()
        service.rollback("test")
        assert daemon.slot.current().version == "1.0.0"
        assert options_of(daemon.slot.current().backend) == (THREADS, list(PROVIDERS))
        # the rollback's load (a shadow load of 1.0.0 still under way may add one more)
        assert loads and all(load == ("1.0.0", (THREADS, list(PROVIDERS))) for load in loads)
    finally:
        daemon.shutdown()


def test_gate_without_a_daemon_loads_both_models_with_the_configured_options(
    device: Device,
) -> None:
    svc = device.service()
    svc.install_file(device.package("1.0.0", 1))
    feed_frames(svc, 20)
    svc.close()
    svc = device.service()
    svc.config = configured(device)
    current = svc.state_dir / "current"
    for source in (current, current.resolve() / "model.onnx"):
        backend = svc._load_for_gate(source)
        try:
            assert options_of(backend) == (THREADS, list(PROVIDERS))
        finally:
            backend.close()
    svc.close()


def test_package_backend_follows_the_configured_backend_only_when_it_fits() -> None:
    assert package_backend_name("onnx", "tensorrt", "m") == "tensorrt"
    assert package_backend_name("onnx", "onnx", "m") == "onnx"
    assert package_backend_name("onnx", "litert", "m") == "auto"
    assert package_backend_name("tflite", "onnx", "m") == "litert"
    with pytest.raises(ModelError, match=r"unknown runtime\.kind 'caffe'"):
        package_backend_name("caffe", "auto", "m")
