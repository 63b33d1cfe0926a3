"""The fleet server over real HTTP answers every body it cannot take with a 4xx, never a 500."""

from __future__ import annotations

import copy
import gzip
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from fleet_testlib import ota_record, running_server

from agent.fleet.ingest import MAX_VALUE_DEPTH
from agent.fleet.keys import OperatorKey
from agent.fleet.repo import init_repo
from agent.fleet.server import ServerConfig, create_app
from agent.fleet.store_sqlite import SQLiteTelemetryStore
from agent.fleet.tokens import add_device_token
from agent.telemetry import otlp

DEVICE = "cam-1"
MAX_BODY_BYTES = 64 << 10
MAX_INFLATED_BYTES = 256 << 10


@dataclass
class Server:
    url: str
    token: str
    store: SQLiteTelemetryStore


@pytest.fixture()
def server(tmp_path: Path, operator_keys: list[OperatorKey]) -> Iterator[Server]:
    base = tmp_path / "repo"
    init_repo(base, operator_keys, release_threshold=2)
    tokens_path = tmp_path / "tokens.json"
    token = add_device_token(tokens_path, DEVICE)
    store = SQLiteTelemetryStore(tmp_path / "fleet.db")
    config = ServerConfig(
        repo_dir=base,
        db_url=str(tmp_path / "fleet.db"),
        tokens_path=tokens_path,
        max_body_bytes=MAX_BODY_BYTES,
        max_decompressed_bytes=MAX_INFLATED_BYTES,
    )
    with running_server(create_app(config, store)) as url:
        yield Server(url, token, store)
    store.close()


def _logs(seq: int = 1) -> dict[str, Any]:
    return dict(otlp.logs_request([ota_record(DEVICE, seq, "IDLE", "1.0.0", time.time_ns())]))


def _metrics() -> dict[str, Any]:
    point = {
        "timeUnixNano": "1",
        "asDouble": 5.0,
        "attributes": [{"key": "edge_agent.device_id", "value": {"stringValue": DEVICE}}],
    }
    return {
        "resourceMetrics": [
            {"scopeMetrics": [{"metrics": [{"name": "fps", "gauge": {"dataPoints": [point]}}]}]}
        ]
    }


def _edit(make: Callable[[], dict[str, Any]], change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = copy.deepcopy(make())
    change(doc)
    return json.dumps(doc).encode()


def _record(doc: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = doc["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    return record


def _set_attr(doc: dict[str, Any], key: str, value: Any) -> None:
    for item in _record(doc)["attributes"]:
        if item["key"] == key:
            item["value"] = value
            return
    _record(doc)["attributes"].append({"key": key, "value": value})


def _nested_kvlist(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"stringValue": "leaf"}
    for _ in range(levels):
        value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    return value


def _point(doc: dict[str, Any]) -> dict[str, Any]:
    metric = doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]
    point: dict[str, Any] = metric["gauge"]["dataPoints"][0]
    return point


@dataclass(frozen=True)
class BodyRow:
    """What a device (holding a valid token) or a broken proxy sends, and the answer."""

    id: str
    body: bytes
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/logs"


VALID = json.dumps(_logs()).encode()

BODY_ROWS = [
    BodyRow("bad-json", b"{not json", 400, "not JSON"),
    BodyRow("empty-body", b"", 400, "not JSON"),
    BodyRow("invalid-utf-8", b'\xff\xfe\xfd{"resourceLogs": []}', 400, "not JSON"),
    BodyRow("top-level-list", b"[1, 2]", 400, "expected a JSON object"),
    BodyRow(
        "deeply-nested-json",
        b"[" * 30_000 + b"]" * 30_000,
        400,
        "nested too deeply",
    ),
    BodyRow(
        "deeply-nested-object-json",
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        400,
        "nested too deeply",
    ),
    BodyRow(
        "huge-integer-literal",
        b'{"resourceLogs": [], "x": ' + b"9" * 5000 + b"}",
        400,
        "not JSON",
    ),
    BodyRow(
        "resource-is-a-string",
        _edit(_logs, lambda d: d["resourceLogs"][0].update(resource="cam-1")),
        400,
        "resource: expected an object",
    ),
    BodyRow(
        "scope-logs-is-an-object",
        _edit(_logs, lambda d: d["resourceLogs"][0].update(scopeLogs={"a": 1})),
        400,
        "expected a list",
    ),
    BodyRow(
        "attributes-is-an-object",
        _edit(_logs, lambda d: _record(d).update(attributes={"k": "v"})),
        400,
        "expected a list",
    ),
    BodyRow(
        "kvlist-value-is-a-string",
        _edit(_logs, lambda d: _set_attr(d, "edge_agent.attr.reason", {"kvlistValue": "x"})),
        400,
        "kvlistValue: expected an object",
    ),
    BodyRow(
        "array-value-is-a-list",
        _edit(_logs, lambda d: _set_attr(d, "edge_agent.attr.reason", {"arrayValue": [1]})),
        400,
        "arrayValue: expected an object",
    ),
    BodyRow(
        "kvlist-nested-past-the-limit",
        _edit(
            _logs,
            lambda d: _set_attr(d, "edge_agent.attr.reason", _nested_kvlist(MAX_VALUE_DEPTH + 5)),
        ),
        400,
        f"nested deeper than {MAX_VALUE_DEPTH}",
    ),
    BodyRow(
        "time-is-infinite",
        _edit(_logs, lambda d: _record(d).update(timeUnixNano=float("inf"))),
        400,
        "timeUnixNano is not an integer",
    ),
    BodyRow(
        "time-is-nan",
        _edit(_logs, lambda d: _record(d).update(timeUnixNano=float("nan"))),
        400,
        "timeUnixNano is not an integer",
    ),
    BodyRow(
        "time-past-int64",
        _edit(_logs, lambda d: _record(d).update(timeUnixNano=str(1 << 70))),
        400,
        "outside 0..2^63-1",
    ),
    BodyRow(
        "int-value-infinite",
        _edit(_logs, lambda d: _set_attr(d, "edge_agent.attr.n", {"intValue": float("inf")})),
        400,
        "intValue is not an integer",
    ),
    BodyRow(
        "double-value-overflows-float",
        _edit(_logs, lambda d: _set_attr(d, "edge_agent.attr.x", {"doubleValue": 10**400})),
        400,
        "doubleValue is not a number",
    ),
    BodyRow(
        "seq-past-int64",
        _edit(_logs, lambda d: _set_attr(d, "edge_agent.seq", {"intValue": str(1 << 64)})),
        400,
        "outside 0..2^63-1",
    ),
    BodyRow(
        "metric-value-overflows-float",
        _edit(_metrics, lambda d: _point(d).update(asDouble=10**400)),
        400,
        "value is not a number",
        path="/v1/metrics",
    ),
    BodyRow(
        "metric-resource-is-a-list",
        _edit(_metrics, lambda d: d["resourceMetrics"][0].update(resource=[1])),
        400,
        "resource: expected an object",
        path="/v1/metrics",
    ),
    BodyRow(
        "metric-points-nested-json",
        b'{"resourceMetrics": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        400,
        "nested too deeply",
        path="/v1/metrics",
    ),
    BodyRow(
        "not-gzip", b"\x1f\x8b not really gzip", 400, "not valid gzip", {"Content-Encoding": "gzip"}
    ),
    BodyRow(
        "gzip-cut-short",
        gzip.compress(VALID)[:-12],
        400,
        "cut short",
        {"Content-Encoding": "gzip"},
    ),
    BodyRow(
        "gzip-with-trailing-bytes",
        gzip.compress(VALID) + b"trailing",
        400,
        "bytes after the stream",
        {"Content-Encoding": "gzip"},
    ),
    BodyRow(
        "gzip-bomb",
        gzip.compress(b" " * (MAX_INFLATED_BYTES * 4)),
        413,
        "inflates past the limit",
        {"Content-Encoding": "gzip"},
    ),
    BodyRow("over-size", b" " * (MAX_BODY_BYTES + 1), 413, "body over"),
    BodyRow(
        "unknown-content-encoding",
        VALID,
        415,
        "Content-Encoding 'br' is not supported",
        {"Content-Encoding": "br"},
    ),
    BodyRow(
        "wrong-content-type",
        VALID,
        415,
        "application/json",
        {"Content-Type": "text/plain"},
    ),
    BodyRow(
        "protobuf-content-type",
        VALID,
        415,
        "application/json",
        {"Content-Type": "application/x-protobuf"},
    ),
]


@pytest.mark.parametrize("row", BODY_ROWS, ids=[r.id for r in BODY_ROWS])
def test_unparseable_bodies_get_a_short_json_error(
    row: BodyRow, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.fleet.server")
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {server.token}",
        **row.headers,
    }
    answer = requests.post(f"{server.url}{row.path}", data=row.body, headers=headers, timeout=30)
    assert answer.status_code == row.status, answer.text[:500]
    error = answer.json()["error"]
    assert row.message in error, error
    assert len(error) < 300 and "Traceback" not in answer.text
    assert row.message in caplog.text
    assert server.store.count_rows("logs") == 0 and server.store.count_rows("metrics") == 0
    # The server is unharmed: the next good request from the device is stored.
    good = {"Content-Type": "application/json", "Authorization": f"Bearer {server.token}"}
    after = requests.post(f"{server.url}/v1/logs", data=VALID, headers=good, timeout=30)
    assert after.status_code == 200, after.text
    assert server.store.count_rows("logs") == 1


def test_the_valid_bodies_the_rows_start_from_are_accepted(server: Server) -> None:
    """Each row breaks one thing in a body that is otherwise accepted."""
    headers = {"Authorization": f"Bearer {server.token}"}
    for path, body, extra in (
        ("/v1/logs", VALID, {"Content-Type": "application/json; charset=utf-8"}),
        ("/v1/logs", gzip.compress(json.dumps(_logs(2)).encode()), {"Content-Encoding": "gzip"}),
        ("/v1/logs", json.dumps(_logs(3)).encode(), {"Content-Encoding": "identity"}),
        (
            "/v1/logs",
            _edit(
                lambda: _logs(4),
                lambda d: _set_attr(d, "edge_agent.attr.reason", _nested_kvlist(MAX_VALUE_DEPTH)),
            ),
            {},
        ),
        ("/v1/metrics", json.dumps(_metrics()).encode(), {}),
    ):
        answer = requests.post(
            f"{server.url}{path}",
            data=body,
            headers={"Content-Type": "application/json", **headers, **extra},
            timeout=30,
        )
        assert answer.status_code == 200, (path, extra, answer.text)
    assert server.store.count_rows("logs") == 4 and server.store.count_rows("metrics") == 1


def test_metadata_names_must_match_whole(server: Server, tmp_path: Path) -> None:
    """A name is served only when all of it matches: a trailing newline is not ignored."""
    (tmp_path / "repo" / "metadata" / "1.root.json\n").write_text("{}")
    assert requests.get(f"{server.url}/metadata/1.root.json", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/metadata/1.root.json%0A", timeout=10).status_code == 404
