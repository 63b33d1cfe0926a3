"""The daemon in-process: frames flow to sinks, hot swap drops nothing, packages, pause, control."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import load_config
from agent.control import control_request
from agent.daemon import Daemon, prometheus_text
from agent.errors import ConfigError, ModelError


def start(config_path: Path) -> tuple[Daemon, threading.Thread, list[int]]:
    daemon = Daemon(load_config(config_path), config_path)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()), daemon=True)
    thread.start()
    return daemon, thread, codes


def stop(daemon: Daemon, thread: threading.Thread) -> None:
    daemon.request_stop("test")
    thread.join(15)
    assert not thread.is_alive()


def results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def test_frames_reach_the_sink_and_status_is_written(
    make_config: Callable[..., Path], tmp_path: Path, helpers: Any
) -> None:
    cfg = make_config(scheduler={"fps_cap": 0}, source={"kind": "synthetic", "max_frames": 40})
    _daemon, thread, codes = start(cfg)
    thread.join(30)
    assert codes == [0]  # the source ended: a clean exit
    out = results(tmp_path / "out" / "results.jsonl")
    assert [r["seq"] for r in out] == list(range(1, 41))
    assert out[0]["model"] == "digits_fp32" or out[0]["model"] == "digits"
    assert {"class", "score", "label"} <= set(out[0]["top"][0])
    status = json.loads((tmp_path / "st" / "status.json").read_text())
    assert status["state"] == "stopped" and status["frames"] == 40
    assert status["latency_ms"]["p50"] > 0 and status["dropped"] == 0


def test_hot_swap_lands_between_frames_and_drops_none(
    make_config: Callable[..., Path], tmp_path: Path, helpers: Any, digits_model: Path
) -> None:
    daemon, thread, _ = start(make_config(scheduler={"fps_cap": 100}))
    try:
        helpers.wait_for(lambda: daemon.stats.frames >= 20, what="20 frames")
        candidate = daemon.load_configured_model()  # loaded and warmed beside the live one
        candidate = type(candidate)(**{**candidate.__dict__, "version": "2.0.0"})
        old = daemon.swap_model(candidate)
        assert old is not None and old.version == "local"
        helpers.wait_for(lambda: daemon.stats.frames >= 60, what="60 frames")
    finally:
        stop(daemon, thread)
    out = results(tmp_path / "out" / "results.jsonl")
    seqs = [r["seq"] for r in out]
    assert seqs == list(range(1, len(seqs) + 1))  # no frame lost across the swap
    versions = [r["version"] for r in out]
    switch = versions.index("2.0.0")
    assert set(versions[:switch]) == {"local"} and set(versions[switch:]) == {"2.0.0"}
    assert old.backend._session is None  # the retired model was closed by the loop


def install_package(state: Path, model: Path, version: str = "1.2.0") -> Path:
    pkg = state / "models" / f"digits-{version}"
    pkg.mkdir(parents=True)
    shutil.copy(model, pkg / "model.onnx")
    manifest = {
        "format": 1,
        "name": "digits",
        "version": version,
        "release_counter": 2,
        "task": "classification",
        "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
        "preprocess": {
            "resize": [8, 8],
            "layout": "NCHW",
            "color_order": "GRAY",
            "mean": [0.0],
            "std": [1.0],
            "scale": 1 / 255,
        },
        "labels": [f"digit-{i}" for i in range(10)],
    }
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    os.symlink(pkg.relative_to(state), state / "current")
    return pkg


def test_installed_package_wins_over_model_path(
    make_config: Callable[..., Path], tmp_path: Path, digits_model: Path
) -> None:
    install_package(tmp_path / "st", digits_model)
    daemon = Daemon(load_config(make_config(preprocess={"color_order": "RGB"})))
    model = daemon.load_initial_model()
    assert (model.name, model.version) == ("digits", "1.2.0")
    assert model.preprocess.color_order == "GRAY" and model.labels[3] == "digit-3"
    assert model.manifest is not None


def test_broken_package_falls_back_to_model_path_or_fails_clearly(
    make_config: Callable[..., Path], tmp_path: Path, digits_model: Path
) -> None:
    pkg = install_package(tmp_path / "st", digits_model)
    (pkg / "model.onnx").write_bytes(b"garbage")
    daemon = Daemon(load_config(make_config()))
    assert daemon.load_initial_model().version == "local"
    daemon = Daemon(load_config(make_config(model={"path": None})))
    with pytest.raises(ModelError, match=r"model.onnx"):
        daemon.load_initial_model()


def test_no_model_at_all_is_a_config_error(make_config: Callable[..., Path]) -> None:
    daemon = Daemon(load_config(make_config(model={"path": None})))
    with pytest.raises(ConfigError, match=r"model.path: no model configured"):
        daemon.load_initial_model()


def test_hard_limit_pauses_and_cooling_resumes(
    make_config: Callable[..., Path], helpers: Any, tmp_path: Path
) -> None:
    sysfs = helpers.FakeSysfs(tmp_path / "sys")
    sysfs.zone(0, 50.0)
    daemon, thread, _ = start(
        make_config(scheduler={"fps_cap": 50}, governor={"hysteresis_c": 5.0})
    )
    try:
        helpers.wait_for(lambda: daemon.stats.frames >= 5, what="frames")
        sysfs.set_temp(0, 90.0)
        helpers.wait_for(lambda: daemon._state == "paused", what="pause")
        paused_at = daemon.stats.frames
        snap = daemon.write_status()
        assert snap["governor"]["state"] == "paused" and snap["temps_c"]["cpu-thermal"] == 90.0
        helpers.wait_for(lambda: daemon.governor and daemon.governor.tick(), 2, "a tick")
        assert daemon.stats.frames <= paused_at + 1  # at most the frame already in flight
        sysfs.set_temp(0, 60.0)
        helpers.wait_for(lambda: daemon.stats.frames > paused_at + 5, what="resumed frames")
        assert daemon.governor is not None and daemon.governor.state != "paused"
    finally:
        stop(daemon, thread)


def test_control_socket_status_and_reload(
    make_config: Callable[..., Path], helpers: Any, tmp_path: Path
) -> None:
    cfg = make_config(scheduler={"fps_cap": 20})
    daemon, thread, _ = start(cfg)
    sock = tmp_path / "st" / "control.sock"
    try:
        helpers.wait_for(lambda: sock.exists() and daemon.stats.frames > 2, what="socket")
        status = control_request(sock, {"cmd": "status"})["status"]
        assert status["model"]["name"].startswith("digits") and status["fps_cap"] == 20
        make_config(scheduler={"fps_cap": 7})  # rewrites the same file
        reply = control_request(sock, {"cmd": "reload"})
        assert reply["ok"] is True and "scheduler" in reply["changed"]
        assert daemon.scheduler.fps_cap == 7
        (tmp_path / "agent.yaml").write_text("scheduler: {fps_cap: -1}\n")
        reply = control_request(sock, {"cmd": "reload"})
        assert reply["ok"] is False and "fps_cap" in reply["error"]
        assert daemon.scheduler.fps_cap == 7  # the old config is kept
        assert "edge_agent_fps_cap 7" in prometheus_text(daemon.status_snapshot())
    finally:
        stop(daemon, thread)


def test_bad_frames_are_skipped_not_fatal(make_config: Callable[..., Path], tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    np.save(frames / "a.npy", np.zeros((8, 8), np.uint8))
    np.save(frames / "b.npy", np.zeros((8, 8, 5), np.uint8))  # 5 channels: cannot be gray
    np.save(frames / "c.npy", np.full((16, 16), 255, np.uint8))
    cfg = make_config(
        source={"kind": "directory", "path": str(frames)},
        scheduler={"fps_cap": 0},
        preprocess={"color_order": "RGB"},
        model={"path": str(make_rgb_model(tmp_path))},
    )
    daemon, thread, codes = start(cfg)
    thread.join(30)
    assert codes == [0]
    out = results(tmp_path / "out" / "results.jsonl")
    assert [Path(r["source"]).name for r in out] == ["a.npy", "c.npy"]
    assert daemon.stats.bad_frames == 1 and "5 channels" in daemon.stats.last_error


def make_rgb_model(tmp_path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["input"], ["logits"], axes=[2, 3], keepdims=0)
    graph = helper.make_graph(
        [node],
        "rgb_mean",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "rgb.onnx"
    onnx.save_model(model, str(path))
    return path


def test_ota_service_attaches_its_commands_when_enabled(
    make_config: Callable[..., Path], helpers: Any, tmp_path: Path
) -> None:
    pytest.importorskip("agent.ota.service")
    daemon, thread, _ = start(make_config(ota={"enabled": True}))
    sock = tmp_path / "st" / "control.sock"
    try:
        helpers.wait_for(lambda: daemon.stats.frames > 2, what="frames")
        assert {"install", "update", "rollback"} <= set(daemon.control.commands())
        assert daemon._ota_observe is not None  # probation is fed every frame
        reply = control_request(sock, {"cmd": "install", "path": str(tmp_path / "none.tar")})
        assert reply["ok"] is False and reply["error"]
    finally:
        stop(daemon, thread)


def test_ota_off_registers_only_status_and_reload(
    make_config: Callable[..., Path], helpers: Any
) -> None:
    daemon, thread, _ = start(make_config())
    try:
        helpers.wait_for(lambda: daemon.stats.frames > 2, what="frames")
        assert daemon.control.commands() == ["reload", "status"]
    finally:
        stop(daemon, thread)


def test_a_second_daemon_on_the_same_state_dir_is_refused_and_harmless(
    make_config: Callable[..., Path], helpers: Any, tmp_path: Path
) -> None:
    from agent.errors import StateError

    cfg = make_config()
    first, thread, _ = start(cfg)
    sock = tmp_path / "st" / "control.sock"
    try:
        helpers.wait_for(lambda: sock.exists() and first.stats.frames > 2, what="first")
        second = Daemon(load_config(cfg), cfg)
        with pytest.raises(StateError, match="another daemon"):
            second.run()
        # the first daemon keeps its socket and its status file
        assert control_request(sock, {"cmd": "status"})["status"]["pid"] == os.getpid()
        helpers.wait_for(
            lambda: json.loads((tmp_path / "st" / "status.json").read_text())["state"] == "running",
            what="status still the first daemon's",
        )
    finally:
        stop(first, thread)


def test_telemetry_gets_start_stop_governor_steps_samples_and_summaries(
    make_config: Callable[..., Path], helpers: Any, tmp_path: Path
) -> None:
    pytest.importorskip("agent.telemetry.recorder")
    import sqlite3

    sysfs = helpers.FakeSysfs(tmp_path / "sys")
    sysfs.zone(0, 50.0)
    db = tmp_path / "st" / "telemetry.db"
    cfg = make_config(
        telemetry={"enabled": True, "sample_rate": 1.0, "summary_interval_s": 0.5},
        scheduler={"fps_cap": 50},
        device_id="dev-1",
    )
    daemon, thread, _ = start(cfg)
    try:
        helpers.wait_for(lambda: daemon.stats.frames > 5, what="frames")
        sysfs.set_temp(0, 75.0)
        helpers.wait_for(lambda: daemon.scheduler.fps_cap < 50, what="a governor step")
    finally:
        stop(daemon, thread)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT type, name, attrs, device_id FROM records").fetchall()
    names = {(r[0], r[1]) for r in rows}
    assert ("event", "daemon.start") in names and ("event", "daemon.stop") in names
    assert ("summary", "inference.summary") in names
    assert any(t == "sample" for t, _ in names)
    steps = [json.loads(r[2]) for r in rows if r[1] == "governor.step"]
    assert steps and steps[0]["state"] == "throttled" and steps[0]["temp_c"] == 75.0
    assert {r[3] for r in rows} == {"dev-1"}


def test_micro_batching_gathers_frames_within_max_wait(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = make_config(
        scheduler={"fps_cap": 0, "max_batch": 4, "max_wait_ms": 50},
        source={"kind": "synthetic", "max_frames": 22},
    )
    daemon, thread, codes = start(cfg)
    thread.join(30)
    assert codes == [0]
    out = results(tmp_path / "out" / "results.jsonl")
    assert [r["seq"] for r in out] == list(range(1, 23))
    assert daemon.stats.frames == 22 and daemon.stats.batches == 6  # 5 x 4 + 1 x 2
    # every frame of a batch reports the batch's run time
    assert len({r["latency_ms"] for r in out[:4]}) == 1


def test_watchdog_is_not_fed_while_the_frame_loop_is_stuck(
    make_config: Callable[..., Path], tmp_path: Path, helpers: Any
) -> None:
    from agent.sdnotify import Notifier

    listener = helpers.NotifyListener(tmp_path / "wd.sock")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "4000000"})
        daemon = Daemon(load_config(make_config()), notifier=notifier)
        daemon.start()
        try:
            daemon._status_tick()
            assert listener.seen("WATCHDOG=1")
            listener.messages.clear()
            daemon._heartbeat -= 60.0  # the loop has not come round for a minute
            daemon._state = "running"
            daemon._status_tick()
            assert not listener.seen("WATCHDOG=1")
            assert daemon.status_snapshot()["state"] == "stalled"
        finally:
            daemon.shutdown()
    finally:
        listener.close()


def test_prometheus_endpoint_on_localhost(make_config: Callable[..., Path], helpers: Any) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon, thread, _ = start(make_config(status={"prometheus_port": port}))
    try:
        helpers.wait_for(lambda: daemon.stats.frames > 3, what="frames")
        url = f"http://127.0.0.1:{port}/metrics"
        body = helpers.wait_for(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode(), what="metrics"
        )
    finally:
        stop(daemon, thread)
    assert "edge_agent_fps_cap 20" in body and "edge_agent_frames_total" in body
    assert 'edge_agent_latency_ms{quantile="0.95"}' in body


def test_tflite_model_with_a_fixed_batch_runs_one_frame_per_batch(
    make_config: Callable[..., Path], tmp_path: Path, demo_models: Path
) -> None:
    model = demo_models / "digits_fp32.tflite"
    if not model.exists():
        pytest.skip("the TFLite demo model is not built")
    pytest.importorskip("ai_edge_litert")
    cfg = make_config(
        model={"path": str(model), "backend": "litert"},
        scheduler={"fps_cap": 0, "max_batch": 4, "max_wait_ms": 20},
        source={"kind": "synthetic", "max_frames": 12},
    )
    daemon, thread, codes = start(cfg)
    thread.join(30)
    assert codes == [0] and daemon.stats.frames == 12 and daemon.stats.errors == 0
    fixed = daemon.slot.current().backend.max_batch()
    assert daemon.stats.batches == (12 if fixed == 1 else 3)
    out = results(tmp_path / "out" / "results.jsonl")
    assert [r["seq"] for r in out] == list(range(1, 13))
