"""The server over real HTTP: OTLP ingest, de-dup, auth, limits, files, status, controller."""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from fleet_testlib import (
    build_package,
    device_fetch_channel,
    ota_record,
    provision_device,
    running_server,
)

from agent.fleet.keys import OperatorKey
from agent.fleet.repo import init_repo, load_repo, publish_package, read_channel
from agent.fleet.rollout import RolloutPolicy, is_member, start_rollout
from agent.fleet.server import ServerConfig, create_app
from agent.fleet.store import TelemetryStore
from agent.fleet.store_sqlite import SQLiteTelemetryStore
from agent.fleet.tokens import add_device_token, add_operator_token
from agent.telemetry import otlp
from agent.telemetry.uploader import OtlpHttpExporter

SALT = "0123456789abcdef"


def _fleet_ids(count: int) -> list[str]:
    """Device ids with at least two in the first 1 % stage for SALT."""
    ids = [f"dev-{i:04d}" for i in range(count)]
    members = [d for d in (f"canary-{i}" for i in range(5000)) if is_member(d, SALT, 1.0)]
    return members[:2] + ids


OPERATOR = "operator"  # the operator token's key in Env.tokens (not a device)


@dataclass
class Env:
    url: str
    base: Path
    store: TelemetryStore
    tokens: dict[str, str]
    devices: list[str]


def _make_env(
    tmp_path: Path, keys: list[OperatorKey], policy: RolloutPolicy
) -> tuple[ServerConfig, TelemetryStore, dict[str, str], list[str]]:
    base = tmp_path / "repo"
    init_repo(base, keys, release_threshold=2)
    release = [k for k in keys if k.role == "release"]
    publish_package(base, build_package(tmp_path / "p", release), keys)
    start_rollout(base, "stable", "1.0.0", keys, policy, package="digits", salt=SALT)
    devices = _fleet_ids(6)
    tokens_path = tmp_path / "tokens.json"
    tokens = {d: add_device_token(tokens_path, d) for d in devices}
    tokens[OPERATOR] = add_operator_token(tokens_path, OPERATOR)  # reads need one
    store = SQLiteTelemetryStore(tmp_path / "fleet.db")
    config = ServerConfig(
        repo_dir=base,
        db_url=str(tmp_path / "fleet.db"),
        tokens_path=tokens_path,
        max_body_bytes=64 << 10,
        max_decompressed_bytes=256 << 10,
        controller_interval_s=0.2,
    )
    return config, store, tokens, devices


@pytest.fixture()
def env(tmp_path: Path, operator_keys: list[OperatorKey]) -> Iterator[Env]:
    config, store, tokens, devices = _make_env(tmp_path, operator_keys, RolloutPolicy())
    with running_server(create_app(config, store)) as url:
        yield Env(url, config.repo_dir, store, tokens, devices)
    store.close()


def _exporter(env: Env, device: str) -> OtlpHttpExporter:
    return OtlpHttpExporter(env.url, headers={"Authorization": f"Bearer {env.tokens[device]}"})


def test_ingest_from_real_exporter_deduplicates_by_device_boot_seq(env: Env) -> None:
    device = env.devices[0]
    now_ns = time.time_ns()
    batch = [ota_record(device, seq, "DOWNLOADING", "1.0.0", now_ns + seq) for seq in range(5)]
    exporter = _exporter(env, device)
    assert exporter.send(batch).outcome == "acked"
    assert env.store.count_rows("logs") == 5
    # A retry after a lost acknowledgement resends rows the server already has.
    again = [*batch[2:], ota_record(device, 5, "COMMITTED", "1.0.0", now_ns + 5)]
    assert exporter.send(again).outcome == "acked"
    assert env.store.count_rows("logs") == 6
    # The same seq after a reboot (new boot_id) is a new row.
    rebooted = ota_record(device, 0, "IDLE", "1.0.0", now_ns + 9, boot_id="boot-2")
    assert exporter.send([rebooted]).outcome == "acked"
    assert env.store.count_rows("logs") == 7
    assert env.store.latest_states("digits", "1.0.0") == {device: "COMMITTED"}


def test_summary_metrics_are_stored_once(env: Env) -> None:
    from agent.telemetry.store import StoredRecord

    device = env.devices[1]
    now_ns = time.time_ns()
    summary = StoredRecord(
        id=1,
        device_id=device,
        boot_id="b",
        seq=1,
        type="summary",
        priority=1,
        name="summary",
        time_unix_ns=now_ns,
        observed_unix_ns=now_ns,
        clock_ok=True,
        attrs={
            "count": 10,
            "fps": 5.0,
            "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
            "start_unix_ns": now_ns - 10**9,
        },
        size_bytes=100,
    )
    payload = otlp.metrics_request([summary])
    assert payload is not None
    headers = {"Authorization": f"Bearer {env.tokens[device]}"}
    for _ in range(2):
        answer = requests.post(f"{env.url}/v1/metrics", json=payload, headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
    assert env.store.count_rows("metrics") >= 1
    first = env.store.count_rows("metrics")
    assert answer.json()["duplicates"] == first


def _logs_body(device: str, seq: int = 1) -> bytes:
    return json.dumps(otlp.logs_request([ota_record(device, seq, "IDLE", "1.0.0", 1)])).encode()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer not-a-token"}, 401),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
    ],
)
def test_unauthenticated_writes_get_401(env: Env, headers: dict[str, str], status: int) -> None:
    answer = requests.post(
        f"{env.url}/v1/logs",
        data=_logs_body(env.devices[0]),
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )
    assert answer.status_code == status
    assert env.store.count_rows("logs") == 0


def test_a_device_token_cannot_write_for_another_device(env: Env) -> None:
    a, b = env.devices[0], env.devices[1]
    answer = requests.post(
        f"{env.url}/v1/logs",
        data=_logs_body(b),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {env.tokens[a]}"},
        timeout=10,
    )
    assert answer.status_code == 403
    assert env.store.count_rows("logs") == 0


@pytest.mark.parametrize(
    ("body", "encoding", "status", "message"),
    [
        (b"{not json", None, 400, "not JSON"),
        (b"[1, 2]", None, 400, "JSON object"),
        (json.dumps({"resourceLogs": {"x": 1}}).encode(), None, 400, "expected a list"),
        (
            json.dumps(
                {
                    "resourceLogs": [
                        {
                            "scopeLogs": [
                                {
                                    "logRecords": [
                                        {
                                            "attributes": [
                                                {
                                                    "key": "edge_agent.device_id",
                                                    "value": {"stringValue": "DEVICE"},
                                                }
                                            ]
                                        }
                                    ]
                                }
                            ]
                        }
                    ]
                }
            ).encode(),
            None,
            400,
            "boot_id",
        ),
        (b"\x1f\x8b not really gzip", "gzip", 400, "gzip"),
        (b"x" * (70 << 10), None, 413, "body over"),
        (gzip.compress(b" " * (300 << 10)), "gzip", 413, "inflates"),
    ],
)
def test_bad_payloads_are_refused_and_logged(
    env: Env,
    body: bytes,
    encoding: str | None,
    status: int,
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = env.devices[0]
    body = body.replace(b"DEVICE", device.encode())
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {env.tokens[device]}"}
    if encoding:
        headers["Content-Encoding"] = encoding
    caplog.set_level(logging.WARNING, logger="agent.fleet.server")
    answer = requests.post(f"{env.url}/v1/logs", data=body, headers=headers, timeout=10)
    assert answer.status_code == status
    assert message in answer.json()["error"]
    assert message in caplog.text
    assert env.store.count_rows("logs") == 0


def test_repository_files_are_served_and_a_device_can_update_through_the_server(
    env: Env, tmp_path: Path
) -> None:
    answer = requests.get(f"{env.url}/metadata/timestamp.json", timeout=10)
    assert answer.status_code == 200
    assert answer.content == (env.base / "metadata" / "timestamp.json").read_bytes()
    assert requests.get(f"{env.url}/metadata/../.lock", timeout=10).status_code == 404
    assert requests.get(f"{env.url}/rollouts/stable.json", timeout=10).status_code == 404
    state = tmp_path / "device"
    provision_device(state, env.base)
    got = device_fetch_channel(state, env.url)
    assert got.document.salt == SALT
    assert requests.get(got.package.url, timeout=10).status_code == 200


def _operator(env: Env) -> dict[str, str]:
    return {"Authorization": f"Bearer {env.tokens[OPERATOR]}"}


def test_rollout_status_endpoint_counts_reports(env: Env) -> None:
    canary = env.devices[0]
    _exporter(env, canary).send([ota_record(canary, 1, "COMMITTED", "1.0.0", time.time_ns())])
    status = requests.get(
        f"{env.url}/api/rollouts/stable", headers=_operator(env), timeout=10
    ).json()
    assert status["version"] == "1.0.0" and status["percent"] == 1.0
    assert status["committed"] == 1 and status["failed"] == 0
    assert status["members_known"] == 1
    assert status["next_decision"] == "wait"
    assert {"version": "1.0.0", "state": "COMMITTED", "devices": 1} in status[
        "devices_by_version_state"
    ]
    assert (
        requests.get(f"{env.url}/api/rollouts/nope", headers=_operator(env), timeout=10).status_code
        == 404
    )
    assert (
        len(
            requests.get(f"{env.url}/api/rollouts", headers=_operator(env), timeout=10).json()[
                "rollouts"
            ]
        )
        == 1
    )


def test_scheduled_controller_promotes_after_canaries_commit(
    tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    policy = RolloutPolicy(soak_s=0.0, min_devices=2, max_failure_rate=0.05)
    config, store, tokens, devices = _make_env(tmp_path, operator_keys, policy)
    with running_server(create_app(config, store, operator_keys)) as url:
        env = Env(url, config.repo_dir, store, tokens, devices)
        for d in devices[2:]:  # the rest of the fleet says hello, so the server knows it
            _exporter(env, d).send([ota_record(d, 1, "IDLE", "", time.time_ns())])
        for canary in devices[:2]:
            _exporter(env, canary).send(
                [ota_record(canary, 2, "COMMITTED", "1.0.0", time.time_ns())]
            )
        deadline = time.monotonic() + 60
        percent = 1.0
        while time.monotonic() < deadline and percent == 1.0:
            time.sleep(0.1)
            percent = requests.get(
                f"{url}/api/rollouts/stable", headers=_operator(env), timeout=10
            ).json()["percent"]
        assert percent == 10.0
    doc = read_channel(load_repo(config.repo_dir), "stable")
    assert doc is not None and doc["rollout"]["stage"] >= 1
    store.close()
