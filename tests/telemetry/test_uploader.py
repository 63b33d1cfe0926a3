"""The OTLP/HTTP uploader against a real receiver on 127.0.0.1 that validates payloads with
the opentelemetry-proto types, and fails, delays, trickles and resets on command."""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import TelemetryConfig
from agent.telemetry import otlp, telemetry_status
from agent.telemetry.recorder import TelemetryRecorder
from agent.telemetry.sampler import is_sampled
from agent.telemetry.store import PRIORITY_CRITICAL, PRIORITY_SAMPLE, NewRecord, TelemetryStore
from agent.telemetry.uploader import (
    OtlpHttpExporter,
    backoff_delay_s,
    drain,
    parse_retry_after,
)

FAST = TelemetryConfig(
    backoff_initial_s=0.001,
    backoff_max_s=0.02,
    connect_timeout_s=1.0,
    read_timeout_s=1.0,
    request_deadline_s=1.5,
    batch_max_rows=50,
)


def fill(store: TelemetryStore, n: int, kind: str = "sample") -> list[int]:
    now = time.time_ns()
    priority = PRIORITY_SAMPLE if kind == "sample" else PRIORITY_CRITICAL
    records = [
        NewRecord(
            kind, priority, f"t.{kind}", now + i, now + i, True, {"i": i, "nested": {"a": [1, 2]}}
        )
        for i in range(n)
    ]  # type: ignore[arg-type]
    return store.append(records)


def summary_row(store: TelemetryStore) -> None:
    now = time.time_ns()
    attrs = {
        "start_unix_ns": now - 60_000_000_000,
        "frames": 900,
        "fps": 15.0,
        "latency_p50_ms": 3.0,
        "latency_p95_ms": 4.0,
        "latency_p99_ms": 6.5,
        "latency_sum_ms": 2800.0,
        "class_counts": {"3": 600, "7": 300},
        "confidence_bounds": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        "confidence_counts": [0, 0, 0, 0, 0, 100, 200, 300, 200, 100],
        "temps_c": {"cpu-thermal": 61.2},
        "governor_state": "normal",
        "fps_cap": 15.0,
        "telemetry_counters": {"evicted.sample": 4},
    }
    store.append([NewRecord("summary", 1, "inference.summary", now, now, True, attrs)])


@pytest.fixture
def store(db_path: Path) -> TelemetryStore:
    s = TelemetryStore(db_path, "dev-1", "boot-1")
    yield s
    s.close()


def exporter(url: str, **kw: Any) -> OtlpHttpExporter:
    return OtlpHttpExporter(url, {"Authorization": "Bearer tok"}, 1.0, 1.0, 1.5, **kw)


def test_payloads_parse_as_otlp_proto_and_follow_the_contract(
    store: TelemetryStore, receiver: Any
) -> None:
    seqs = fill(store, 3, "event")
    summary_row(store)
    result = drain(store, exporter(receiver.url), FAST)
    assert result.empty and result.acked_rows == 4 and not receiver.received.errors
    assert sorted(receiver.unique_keys()) == [("dev-1", "boot-1", s) for s in [*seqs, seqs[-1] + 1]]
    headers = receiver.received.headers[0]
    assert headers["Content-Encoding"] == "gzip" and headers["Authorization"] == "Bearer tok"
    rec = receiver.received.records[0]
    keys = {kv.key: kv.value for kv in rec.attributes}
    assert keys["edge_agent.seq"].int_value == seqs[0]
    assert keys["edge_agent.type"].string_value == "event"
    assert keys["event.name"].string_value == "t.event"
    assert json.loads(keys["edge_agent.attr.nested"].string_value) == {"a": [1, 2]}
    metrics = {
        m.name: m
        for m in receiver.received.metrics_requests[0].resource_metrics[0].scope_metrics[0].metrics
    }
    assert metrics["edge_agent.inference.frames"].sum.data_points[0].as_int == 900
    assert [
        q.value
        for q in metrics["edge_agent.inference.latency"].summary.data_points[0].quantile_values
    ] == [3.0, 4.0, 6.5]
    assert (
        list(metrics["edge_agent.inference.confidence"].histogram.data_points[0].bucket_counts)[-1]
        == 100
    )
    assert metrics["edge_agent.temperature"].gauge.data_points[0].as_double == 61.2
    resource = {
        kv.key: kv.value.string_value
        for kv in receiver.received.metrics_requests[0].resource_metrics[0].resource.attributes
    }
    assert resource["service.name"] == "edge-agent" and resource["edge_agent.device_id"] == "dev-1"
    assert telemetry_status(store.db_path)["backlog_rows"] == 0


def test_batches_by_count_and_bytes_oldest_first(store: TelemetryStore, receiver: Any) -> None:
    seqs = fill(store, 230)
    result = drain(store, exporter(receiver.url), FAST)
    assert result.acked_rows == 230
    assert len(receiver.received.requests) == 5  # 50+50+50+50+30 rows, logs only
    assert [k[2] for k in receiver.received.keys] == seqs  # oldest first, in order
    fill(store, 100)
    small = TelemetryConfig(batch_max_rows=1000, batch_max_bytes=2048)
    drain(store, exporter(receiver.url), small)
    per_request = [len(r.attributes) for r in receiver.received.records[230:]]
    # About 130 bytes a row: a 2 KiB batch holds at most 15 rows, so at least 7 requests.
    assert len(per_request) == 100 and len(receiver.received.requests) - 5 >= 7


def test_retryable_statuses_and_resets_lose_nothing(
    store: TelemetryStore, make_receiver: Any
) -> None:
    actions = [
        ("status", 503, "0"),
        "reset_before",
        ("status", 429, None),
        "reset_after",
        ("status", 502, None),
        ("status", 504, None),
        ("status", 500, None),
    ]
    server = make_receiver(lambda path, i: actions[i] if i < len(actions) else "ok")
    try:
        seqs = fill(store, 120)
        result = drain(store, exporter(server.url), FAST, rng=random.Random(0))
    finally:
        server.stop()
    assert result.empty and result.retries == 7 and result.acked_rows == 120
    keys = server.received.keys
    assert {k[2] for k in keys} == set(seqs)  # no gap
    assert len(keys) > len(set(keys))  # the reset after processing made duplicates ...
    assert telemetry_status(store.db_path)["backlog_rows"] == 0  # ... which the server drops


def test_400_quarantines_the_batch_and_is_never_retried(
    store: TelemetryStore, make_receiver: Any
) -> None:
    server = make_receiver(lambda path, i: ("status", 400, None) if i == 0 else "ok")
    try:
        fill(store, 80)
        result = drain(store, exporter(server.url), FAST)
    finally:
        server.stop()
    assert result.rejected_batches == 1 and result.rejected_rows == 50 and result.retries == 0
    assert result.acked_rows == 30 and len(server.received.requests) == 2
    status = telemetry_status(store.db_path)
    assert status["quarantined_rows"] == 50 and status["backlog_rows"] == 0
    assert "HTTP 400" in status["last_quarantine_reason"]
    assert status["counters"]["quarantined.batches"] == 1


def test_garbage_2xx_body_counts_as_acknowledged(store: TelemetryStore, make_receiver: Any) -> None:
    server = make_receiver(lambda path, i: "garbage")
    try:
        fill(store, 10)
        assert drain(store, exporter(server.url), FAST).acked_rows == 10
    finally:
        server.stop()


def test_trickling_server_hits_the_deadline_and_nothing_is_deleted(
    store: TelemetryStore, make_receiver: Any
) -> None:
    # One byte a second never trips the per-read timeout; the whole-request deadline does.
    server = make_receiver(lambda path, i: ("trickle", 1.0) if i == 0 else "ok")
    try:
        fill(store, 20)
        slow = exporter(server.url)
        slow.request_deadline_s = 0.5
        first = drain(store, slow, FAST, max_retries=0)
        assert first.retries == 1 and "no complete answer" in first.last_error
        assert telemetry_status(store.db_path)["backlog_rows"] == 20
        assert drain(store, slow, FAST).acked_rows == 20
    finally:
        server.stop()


def test_server_down_then_back_drains_backlog(store: TelemetryStore, make_receiver: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seqs = fill(store, 60)
    down = drain(store, exporter(f"http://127.0.0.1:{port}"), FAST, max_retries=3)
    assert down.retries == 4 and down.acked_rows == 0 and not down.empty
    assert telemetry_status(store.db_path)["backlog_rows"] == 60
    server = make_receiver(port=port)
    try:
        assert drain(store, exporter(server.url), FAST).acked_rows == 60
        assert [k[2] for k in server.received.keys] == seqs
    finally:
        server.stop()


def test_backoff_is_capped_full_jitter_and_honors_retry_after() -> None:
    rng = random.Random(3)
    delays = [backoff_delay_s(a, 1.0, 30.0, rng, None) for a in range(12) for _ in range(50)]
    assert min(delays) >= 0.0 and max(delays) <= 30.0
    assert max(backoff_delay_s(0, 1.0, 30.0, rng, None) for _ in range(200)) <= 1.0
    assert max(delays[-50:]) > 15.0  # late attempts reach the cap region
    assert backoff_delay_s(0, 1.0, 30.0, rng, 7.0) >= 7.0
    assert backoff_delay_s(0, 1.0, 30.0, rng, 9999.0) == 30.0
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now_unix_s=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_bandwidth_cap_paces_requests(store: TelemetryStore, receiver: Any) -> None:
    slept: list[float] = []
    clock = [100.0]

    def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    fill(store, 200)
    capped = exporter(
        receiver.url, bandwidth_bytes_per_s=1000, sleep=fake_sleep, monotonic_s=lambda: clock[0]
    )
    result = drain(store, capped, FAST)
    assert result.acked_rows == 200
    # Every byte but the last request's was paid for by waiting at 1000 bytes/s.
    assert len(slept) == 3 and sum(slept) == pytest.approx(result.sent_bytes / 1000, rel=0.5)


def test_otlp_values_encode_every_type() -> None:
    assert otlp.any_value(True) == {"boolValue": True}
    assert otlp.any_value(2**40) == {"intValue": str(2**40)}
    # NaN/Inf and None are the empty AnyValue: OTLP's null
    assert otlp.any_value(float("nan")) == {} == otlp.any_value(float("-inf"))
    assert otlp.any_value(None) == {}
    assert otlp.any_value([1, "a"]) == {"stringValue": '[1,"a"]'}


def test_recorder_uploads_in_the_background(db_path: Path, receiver: Any) -> None:
    cfg = TelemetryConfig(
        endpoint=receiver.url,
        upload_interval_s=0.05,
        flush_interval_s=0.02,
        summary_interval_s=0.1,
        sample_rate=0.2,
        pii_fields=("plate",),
    )
    recorder = TelemetryRecorder(cfg, "dev-9", db_path, boot_id="boot-9")
    recorder.set_gauges({"cpu": 48.0}, "normal", 15.0)
    recorder.event("ota.state", {"state": "COMMITTED", "version": "1.1.0"})
    for seq in range(300):
        recorder.observe_inference(seq, 0.003, seq % 10, 0.8, {"plate": "AB-123", "camera": "gate"})
    time.sleep(0.3)
    recorder.close()
    # Rows written on close are uploaded by the next flush; drain them to check everything.
    with TelemetryStore(db_path, "dev-9", "boot-9") as store:
        drain(store, exporter(receiver.url), FAST)
    names = [
        next(kv.value.string_value for kv in r.attributes if kv.key == "event.name")
        for r in receiver.received.records
    ]
    assert names.count("inference.sample") == sum(1 for s in range(300) if is_sampled(s, 0.2))
    assert "ota.state" in names and "inference.summary" in names
    for r in receiver.received.records:
        for kv in r.attributes:
            assert "AB-123" not in kv.value.string_value
    assert len(receiver.received.keys) == len(receiver.unique_keys())
    assert telemetry_status(db_path)["backlog_rows"] == 0


def test_cli_status_and_flush(
    db_path: Path, receiver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with TelemetryStore(db_path, "dev", "boot") as store:
        fill(store, 7)
    state = str(db_path.parent)
    assert main(["telemetry", "status", "--state-dir", state]) == 0
    assert "backlog    7 rows" in capsys.readouterr().out
    assert main(["telemetry", "flush", "--state-dir", state, "--endpoint", receiver.url]) == 0
    assert "uploaded 7 rows" in capsys.readouterr().out
    assert main(["telemetry", "status", "--state-dir", state, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counters"]["uploaded.rows"] == 7
    assert main(["telemetry", "flush", "--state-dir", state]) == 2
    assert "no telemetry endpoint" in capsys.readouterr().err
    assert main(["telemetry", "status"]) == 2
    assert main(["telemetry", "flush", "--state-dir", state, "--endpoint", "ftp://x"]) == 2
    assert main(["telemetry", "status", "--state-dir", str(db_path.parent / "missing")]) == 2
    assert "Error: " in capsys.readouterr().err
