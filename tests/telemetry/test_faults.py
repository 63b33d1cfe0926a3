"""Telemetry loses nothing: one row per fault (collector answers, a full disk, NaN, a wrong
clock, bad frames) against real SQLite, a real OTLP receiver on 127.0.0.1, a real full
tmpfs and the daemon in-process."""

from __future__ import annotations

import errno
import json
import logging
import math
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.cli import main
from agent.config import TelemetryConfig, load_config
from agent.daemon import Daemon
from agent.pipeline.sinks import JsonlSink
from agent.pipeline.sources import DirectorySource
from agent.telemetry import jsonsafe, telemetry_status
from agent.telemetry.clock import CLOCK_FLOOR_UNIX_NS, CheckedClock
from agent.telemetry.ratelimit import WarnEvery
from agent.telemetry.recorder import TelemetryRecorder
from agent.telemetry.store import PRIORITY_CRITICAL, NewRecord, TelemetryStore
from agent.telemetry.uploader import OtlpHttpExporter, UploadState, drain

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS = REPO_ROOT / "agent" / "demo" / "models" / "digits_fp32.onnx"
S = 1_000_000_000
YEAR_S = 365 * 24 * 3600
FAST = TelemetryConfig(
    backoff_initial_s=0.001,
    backoff_max_s=0.02,
    connect_timeout_s=2.0,
    read_timeout_s=5.0,
    request_deadline_s=10.0,
    batch_max_rows=50,
)
MakeReceiver = Callable[..., Any]  # conftest's make_receiver: a started OtlpReceiver


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN/Infinity literals, as strict JSON readers do."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def exporter(url: str) -> OtlpHttpExporter:
    return OtlpHttpExporter(url, {"Authorization": "Bearer tok"}, 2.0, 5.0, 10.0)


def fill(store: TelemetryStore, events: int, summaries: int = 1) -> list[int]:
    """Append events and summary rows; returns every seq."""
    now = time.time_ns()
    rows = [
        NewRecord("event", PRIORITY_CRITICAL, "t.event", now + i, now + i, True, {"i": i})
        for i in range(events)
    ]
    for i in range(summaries):
        attrs = {"frames": 10 + i, "fps": 5.0, "fps_cap": 5.0, "temps_c": {"cpu": 50.0}}
        rows.append(NewRecord("summary", 1, "inference.summary", now, now, True, attrs))
    return store.append(rows)


def acked_bits(db: Path) -> dict[int, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT seq, acked FROM records"))


def received_seqs(server: Any) -> list[int]:
    return [int(k[2]) for k in server.received.keys]


class RecordingStop(threading.Event):
    """A stop event whose wait() records the backoff delay instead of sleeping it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(0.0 if timeout is None else timeout)
        return self.is_set()


# -- one function per fault ---------------------------------------------------------------


def refused(code: int) -> Callable[[Path, MakeReceiver], None]:
    def run(tmp_path: Path, make_receiver: MakeReceiver) -> None:
        db = tmp_path / "telemetry.db"
        server = make_receiver(lambda path, i: ("status", code, None) if i < 3 else "ok")
        store = TelemetryStore(db, "dev", "boot")
        seqs = fill(store, 20)
        state = UploadState()
        first = drain(store, exporter(server.url), FAST, max_retries=2, state=state)
        assert first.acked_rows == 0 and first.rejected_batches == 0 and first.retries == 3
        status = telemetry_status(db)
        # kept queued, never quarantined, and the refusal is what status shows
        assert status["backlog_rows"] == 21 and status["quarantined_rows"] == 0
        assert status["upload"].startswith(f"upload refused: {code}")
        assert state.snapshot()["upload"].startswith(f"upload refused: {code}")
        # the token is fixed: the next pass sends every row once
        second = drain(store, exporter(server.url), FAST, state=state)
        assert second.empty and sorted(received_seqs(server)) == sorted(seqs)
        assert telemetry_status(db)["upload"] == "ok" and state.snapshot()["upload"] == "ok"
        store.close()

    return run


def logs_fail_after_metrics(tmp_path: Path, make_receiver: MakeReceiver) -> None:
    db = tmp_path / "telemetry.db"
    first_logs = {"seen": False}

    def plan(path: str, _i: int) -> Any:
        if path == "/v1/logs" and not first_logs["seen"]:
            first_logs["seen"] = True
            return ("status", 500, None)
        return "ok"

    server = make_receiver(plan)
    store = TelemetryStore(db, "dev", "boot")
    seqs = fill(store, 5, summaries=2)
    once = drain(store, exporter(server.url), FAST, max_retries=0)
    assert once.retries == 1 and once.acked_rows == 0
    # the metrics ack is stored: summaries carry the metrics bit, nothing was deleted
    bits = acked_bits(db)
    assert sorted(bits) == sorted(seqs) and sorted(bits.values()) == [0] * 5 + [1, 1]
    assert len(server.received.metrics_requests) == 1
    again = drain(store, exporter(server.url), FAST)
    assert again.empty and again.acked_rows == 7
    # metrics went out once in all (a Collector would have counted a resend twice) ...
    assert len(server.received.metrics_requests) == 1
    points = server.received.metrics_requests[0].resource_metrics[0].scope_metrics[0].metrics
    frames = [m for m in points if m.name == "edge_agent.inference.frames"]
    assert sorted(p.as_int for m in frames for p in m.sum.data_points) == [10, 11]
    # ... and every row's log record arrived exactly once
    assert sorted(received_seqs(server)) == sorted(seqs)
    assert telemetry_status(db)["backlog_rows"] == 0
    store.close()


def too_many_requests(tmp_path: Path, make_receiver: MakeReceiver) -> None:
    db = tmp_path / "telemetry.db"
    server = make_receiver(lambda path, i: ("status", 429, "7") if i == 0 else "ok")
    store = TelemetryStore(db, "dev", "boot")
    seqs = fill(store, 10)
    stop = RecordingStop()
    patient = TelemetryConfig(backoff_initial_s=0.001, backoff_max_s=60.0)
    result = drain(store, exporter(server.url), patient, stop=stop)
    assert result.empty and result.retries == 1 and stop.waits and stop.waits[0] >= 7.0
    assert sorted(received_seqs(server)) == sorted(seqs)
    assert telemetry_status(db)["quarantined_rows"] == 0
    store.close()


def partial_success(tmp_path: Path, make_receiver: MakeReceiver) -> None:
    db = tmp_path / "telemetry.db"
    server = make_receiver(lambda path, i: ("partial", 2) if path == "/v1/logs" else "ok")
    store = TelemetryStore(db, "dev", "boot")
    seqs = fill(store, 8)
    result = drain(store, exporter(server.url), FAST)
    # the server took the batch and said 2 records were dropped: not resent, but counted
    assert result.empty and result.retries == 0
    assert sorted(received_seqs(server)) == sorted(seqs)
    assert telemetry_status(db)["counters"]["rejected_by_server.logs"] == 2
    store.close()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "full"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def jsonl_disk_full(tmp_path: Path, make_receiver: MakeReceiver) -> None:
    mnt = tmp_path / "full"
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * (512 << 10))
    sink = JsonlSink(mnt / "results.jsonl", max_bytes=64 << 20, backups=1, flush_interval_s=0)
    try:
        written = 0
        full = None
        for batch in range(400):
            items = [{"seq": batch * 10 + i, "pad": "x" * 997} for i in range(10)]
            try:
                sink.write_batch(items)
            except OSError as exc:
                full = exc
                break
            written += len(items)
        assert full is not None and full.errno == errno.ENOSPC, "the disk never filled"
        data = (mnt / "results.jsonl").read_bytes()
        # whole lines only: the batch that hit ENOSPC was cut back, not left torn
        assert data.endswith(b"\n") and sink.truncations == 1
        assert [strict_loads(x)["seq"] for x in data.splitlines()] == list(range(written))
        filler.unlink()  # space comes back
        sink.write_batch([{"seq": -1, "after": "recovered"}])
        lines = (mnt / "results.jsonl").read_bytes().splitlines()
        assert len(lines) == written + 1 and strict_loads(lines[-1])["after"] == "recovered"
    finally:
        sink.close()


def nan_everywhere(tmp_path: Path, make_receiver: MakeReceiver) -> None:
    nan, inf = float("nan"), float("inf")
    # a result sink
    sink = JsonlSink(tmp_path / "r.jsonl", max_bytes=1 << 20, backups=0, flush_interval_s=0)
    sink.write_batch([{"score": nan, "top": [{"score": inf, "class": 1}], "ok": 0.5}])
    sink.close()
    line = strict_loads((tmp_path / "r.jsonl").read_text())
    assert line == {"score": None, "top": [{"score": None, "class": 1}], "ok": 0.5}
    # the store and both OTLP requests (the receiver refuses a NaN literal with a 400)
    db = tmp_path / "telemetry.db"
    server = make_receiver()
    store = TelemetryStore(db, "dev", "boot")
    now = time.time_ns()
    attrs = {"frames": 3, "fps": nan, "fps_cap": inf, "temps_c": {"cpu": nan}}
    seqs = store.append(
        [
            NewRecord("event", 3, "error", now, now, True, {"confidence": nan, "list": [-inf]}),
            NewRecord("summary", 1, "inference.summary", now, now, True, attrs),
        ]
    )
    with sqlite3.connect(db) as conn:
        for (text,) in conn.execute("SELECT attrs FROM records"):
            strict_loads(text)
    result = drain(store, exporter(server.url), FAST)
    assert result.empty and result.rejected_batches == 0 and not server.received.errors
    assert sorted(received_seqs(server)) == sorted(seqs)
    store.close()
    # status.json goes through the same writer
    assert strict_loads(jsonsafe.dumps({"fps": nan, "latency_ms": {"p50": inf}})) == {
        "fps": None,
        "latency_ms": {"p50": None},
    }
    # end to end: a model whose every output is NaN, through the daemon's sink, its
    # status file and its telemetry (every result sampled) to the receiver
    config = write_config(
        tmp_path,
        model={"path": str(nan_model(tmp_path)), "warmup_runs": 1},
        source={"kind": "synthetic", "max_frames": 20},
        telemetry={"enabled": True, "endpoint": server.url, "sample_rate": 1.0},
    )
    _daemon, thread, codes = run_daemon(config)
    thread.join(120)
    assert codes == [0]
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 20
    assert all(top["score"] is None for x in lines for top in strict_loads(x)["top"])
    assert strict_loads((tmp_path / "st" / "status.json").read_text())["frames"] == 20
    with TelemetryStore(tmp_path / "st" / "telemetry.db", "dev", "boot") as left:
        assert drain(left, exporter(server.url), FAST).empty
    sampled = {
        attrs["edge_agent.seq"].int_value
        for attrs in ({kv.key: kv.value for kv in r.attributes} for r in server.received.records)
        if attrs["event.name"].string_value == "inference.sample"
    }
    # every frame's sample arrived (a resend after a lost ack would only repeat a seq)
    assert len(sampled) == 20 and not server.received.errors


class FakeClocks:
    def __init__(self, wall: int) -> None:
        self.wall = wall
        self.mono = 5 * S

    def step(self, seconds: float, wall_jump_s: float = 0.0) -> None:
        self.mono += int(seconds * S)
        self.wall += int((seconds + wall_jump_s) * S)


def recorder_on(db: Path, fake: FakeClocks) -> TelemetryRecorder:
    return TelemetryRecorder(
        TelemetryConfig(flush_interval_s=0.02),
        "dev",
        db,
        boot_id="boot",
        start_uploader=False,
        wall_ns=lambda: fake.wall,
        monotonic_ns=lambda: fake.mono,
        clock=CheckedClock(lambda: fake.wall, lambda: fake.mono),
    )


def stamped(db: Path) -> dict[str, tuple[int, int]]:
    with sqlite3.connect(db) as conn:
        return {
            name: (t, ok)
            for name, t, ok in conn.execute(
                "SELECT name, time_unix_ns, clock_ok FROM records ORDER BY id"
            )
        }


def clock_ahead(tmp_path: Path, make_receiver: MakeReceiver) -> None:
    real = CLOCK_FLOOR_UNIX_NS + 900 * 24 * 3600 * S  # mid 2026
    fake = FakeClocks(real)
    # in one run: right, then 10 years ahead for some rows, then set right by NTP
    db = tmp_path / "one-run.db"
    recorder = recorder_on(db, fake)
    recorder.event("t.before", {})
    assert recorder.flush()
    fake.step(1.0, wall_jump_s=10 * YEAR_S)
    recorder.event("t.ahead", {})
    assert recorder.flush()
    fake.step(1.0, wall_jump_s=-10 * YEAR_S)
    recorder.event("t.after", {})
    fake.step(1.0)
    recorder.event("t.later", {})
    assert recorder.flush()
    recorder.close()
    rows = stamped(db)
    assert rows["t.before"] == (real, 1)
    assert rows["t.ahead"][0] == real + S + 10 * YEAR_S * S  # what the clock said
    assert rows["t.after"] == (real + 2 * S, 1)  # the right time again, at once
    assert rows["t.later"] == (real + 3 * S, 1)
    # across a restart: a run whose clock was ahead leaves its time in the store ...
    db2 = tmp_path / "restart.db"
    ahead = FakeClocks(real + 10 * YEAR_S * S)
    recorder = recorder_on(db2, ahead)
    recorder.event("t.ahead", {})
    assert recorder.flush()
    recorder.close()
    # ... and the next run, with the clock right, does not stamp from that time
    right = FakeClocks(real + 60 * S)
    recorder = recorder_on(db2, right)
    recorder.event("t.after_restart", {})
    assert recorder.flush()
    recorder.close()
    rows = stamped(db2)
    assert rows["t.after_restart"] == (real + 60 * S, 1)
    assert "clock.jump" in rows  # the step back behind the stored time is reported


def write_config(tmp_path: Path, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "st"),
        "model": {"path": str(DIGITS), "warmup_runs": 1, "labels": [str(i) for i in range(10)]},
        "preprocess": {"resize": [8, 8], "color_order": "GRAY", "scale": 1 / 255},
        "source": {"kind": "synthetic"},
        "scheduler": {"fps_cap": 0, "drain_timeout_s": 2.0},
        "governor": {"enabled": False},
        "sinks": [{"kind": "jsonl", "path": str(tmp_path / "out" / "results.jsonl")}],
        "telemetry": {"enabled": False},
        "status": {"interval_s": 0.2},
    }
    data.update(sections)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_daemon(config_path: Path) -> tuple[Daemon, threading.Thread, list[int]]:
    daemon = Daemon(load_config(config_path), config_path)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()), daemon=True)
    thread.start()
    return daemon, thread, codes


def nan_model(tmp_path: Path) -> Path:
    """A digits-shaped ONNX model whose ten outputs are all NaN (sqrt of a negative)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Abs", ["flat"], ["abs"]),
        helper.make_node("Neg", ["abs"], ["neg"]),
        helper.make_node("Sub", ["neg", "one"], ["below"]),
        helper.make_node("Sqrt", ["below"], ["nan"]),
        helper.make_node("MatMul", ["nan", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "all_nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
        initializer=[
            helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
            helper.make_tensor("w", TensorProto.FLOAT, [64, 10], [1.0] * 640),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "nan.onnx"
    onnx.save_model(model, str(path))
    return path


def rgb_model(tmp_path: Path) -> Path:
    """A one-node ONNX model on 3x8x8 input (the mean of each channel)."""
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


def bad_frames(tmp_path: Path, make_receiver: MakeReceiver) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    np.save(frames / "a_good.npy", np.zeros((8, 8), np.uint8))
    (frames / "b_not_an_image.png").write_bytes(b"\x89PNG but not really" * 10)
    np.save(frames / "c_flat.npy", np.zeros(64, np.uint8))  # 1-D: not a frame
    (frames / "d_truncated.npy").write_bytes(b"\x93NUMPY\x01\x00")
    np.save(frames / "e_five_channels.npy", np.zeros((8, 8, 5), np.uint8))  # model wants 3
    np.save(frames / "f_good.npy", np.full((8, 8, 3), 255, np.uint8))
    config = write_config(
        tmp_path,
        source={"kind": "directory", "path": str(frames)},
        model={"path": str(rgb_model(tmp_path)), "warmup_runs": 1, "labels": ["r", "g", "b"]},
        preprocess={"color_order": "RGB", "scale": 1 / 255},
    )
    _daemon, thread, codes = run_daemon(config)
    thread.join(120)
    assert codes == [0]
    status = strict_loads((tmp_path / "st" / "status.json").read_text())
    assert status["frames"] == 2, status
    # three the source could not read, one the model input could not take
    assert status["frames_skipped"] == 4, status
    # the last one skipped was the 5-channel frame (the model could not take it)
    assert "e_five_channels" in (status["last_skip_reason"] or ""), status
    source = DirectorySource(frames)
    while source.read(0.0) is not None:
        pass
    assert source.skips.count == 3 and "d_truncated" in (source.skips.last_reason or "")


@dataclass(frozen=True)
class Fault:
    """One fault: what it controls, and what must come out of it."""

    id: str
    fault: str
    expected: str
    run: Callable[[Path, MakeReceiver], None]
    needs_tmpfs: bool = False


FAULTS = [
    Fault(
        "401",
        "the collector answers 401 (token revoked) three times, then 200",
        "rows stay queued, none quarantined; status 'upload refused: 401'; all sent once later",
        refused(401),
    ),
    Fault(
        "403",
        "the collector answers 403 (token for another device) three times, then 200",
        "rows stay queued, none quarantined; status 'upload refused: 403'; all sent once later",
        refused(403),
    ),
    Fault(
        "500-logs-after-metrics",
        "the first logs request answers 500 after its metrics request was acknowledged",
        "metrics are not resent (one metrics request in all); every log record arrives once",
        logs_fail_after_metrics,
    ),
    Fault(
        "429-retry-after",
        "the collector answers 429 with Retry-After: 7",
        "the retry waits at least 7 s; nothing quarantined or lost",
        too_many_requests,
    ),
    Fault(
        "partial-success",
        "every logs answer is 200 with partialSuccess rejectedLogRecords=2",
        "the rows are done (never resent) and rejected_by_server.logs counts 2",
        partial_success,
    ),
    Fault(
        "enospc-jsonl",
        "the JSONL sink's file system (a 1 MiB tmpfs) fills up mid-batch, then frees space",
        "only whole lines in the file; the next batch is written once there is room",
        jsonl_disk_full,
        needs_tmpfs=True,
    ),
    Fault(
        "nan-output",
        "results and telemetry attributes hold NaN and +/-Inf",
        "null in the JSONL line (also from a NaN model in the daemon), the stored row, both "
        "OTLP requests and status.json",
        nan_everywhere,
    ),
    Fault(
        "clock-ahead",
        "the wall clock reads 10 years ahead for some rows (and for a whole run), then right",
        "rows after the correction, and after a restart, carry the right time",
        clock_ahead,
    ),
    Fault(
        "bad-frames",
        "an unreadable image, a 1-D .npy, a truncated .npy, a 5-channel .npy for an RGB model",
        "the daemon keeps going; status.json frames_skipped 4 with the last reason",
        bad_frames,
    ),
]


@pytest.mark.parametrize("case", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(case: Fault, tmp_path: Path, make_receiver: MakeReceiver, request: Any) -> None:
    if case.needs_tmpfs:
        request.getfixturevalue("tiny_tmpfs")
    case.run(tmp_path, make_receiver)


def test_daemon_status_shows_upload_refused_and_keeps_rows(
    tmp_path: Path, make_receiver: MakeReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_receiver(lambda path, i: ("status", 401, None))
    config = write_config(
        tmp_path,
        scheduler={"fps_cap": 50, "drain_timeout_s": 2.0},
        telemetry={
            "enabled": True,
            "endpoint": server.url,
            "upload_interval_s": 0.2,
            "flush_interval_s": 0.05,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
            "summary_interval_s": 0.5,
        },
    )
    daemon, thread, codes = run_daemon(config)
    status_file = tmp_path / "st" / "status.json"
    shown = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if status_file.exists():
                with_status = strict_loads(status_file.read_text())
                shown = (with_status.get("telemetry") or {}).get("upload")
                if shown:
                    break
            time.sleep(0.1)
    finally:
        daemon.request_stop("test")
        thread.join(30)
    assert codes == [0]
    assert shown is not None and shown.startswith("upload refused: 401"), shown
    status = telemetry_status(tmp_path / "st" / "telemetry.db")
    assert status["backlog_rows"] > 0 and status["quarantined_rows"] == 0
    assert status["upload"].startswith("upload refused: 401")
    assert main(["telemetry", "status", "--state-dir", str(tmp_path / "st")]) == 0
    assert "upload     upload refused: 401" in capsys.readouterr().out
    # the daemon's status table (3: it has stopped) shows the last upload error too
    assert main(["status", "--config", str(config)]) == 3
    assert "telemetry:  upload refused: 401" in capsys.readouterr().out


def test_warnings_are_rate_limited_with_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    warn = WarnEvery(clock_s=lambda: now[0])
    logger = logging.getLogger("test.ratelimit")
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        logged = [warn.warn(logger, "cam", 30.0, "camera %s gone", "cam0") for _ in range(6)]
        now[0] += 31.0
        logged.append(warn.warn(logger, "cam", 30.0, "camera %s gone", "cam0"))
        logged.append(warn.warn(logger, "disk", 30.0, "disk full"))  # another key: logged
    assert logged == [True, False, False, False, False, False, True, True]
    assert [r.getMessage() for r in caplog.records] == [
        "camera cam0 gone",
        "camera cam0 gone (5 more in the last 31 s)",
        "disk full",
    ]


def test_jsonl_trims_a_torn_tail_left_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"seq":1}\n{"seq":2}\n{"seq":3,"pa')  # power cut mid-line
    sink = JsonlSink(path, max_bytes=1 << 20, backups=0, flush_interval_s=0)
    sink.write_batch([{"seq": 4}])
    sink.close()
    assert [strict_loads(x)["seq"] for x in path.read_text().splitlines()] == [1, 2, 4]


def test_finite_or_none_keeps_everything_else() -> None:
    value = {"a": [1, 2.5, "x", None, True, {"b": math.nan}], "c": (math.inf, -0.0)}
    assert jsonsafe.finite_or_none(value) == {
        "a": [1, 2.5, "x", None, True, {"b": None}],
        "c": [None, -0.0],
    }
    assert jsonsafe.dumps({"a": 1.5}) == '{"a": 1.5}'
