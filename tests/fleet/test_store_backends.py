"""The telemetry store on SQLite and on a real PostgreSQL server: same cases, same answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from fleet_testlib import build_package, ota_record
from pg_testlib import PostgresServer

from agent.errors import TelemetryError, UsageError
from agent.fleet.ingest import (
    BadPayloadError,
    LogRow,
    MetricRow,
    parse_otlp_logs,
    parse_otlp_metrics,
)
from agent.fleet.keys import OperatorKey
from agent.fleet.open_store import open_store
from agent.fleet.repo import init_repo, publish_package
from agent.fleet.rollout import (
    RolloutPolicy,
    count_reports,
    is_member,
    promote,
    start_rollout,
)
from agent.fleet.store import TelemetryStore
from agent.fleet.tokens import add_device_token, add_operator_token
from agent.telemetry import otlp
from agent.telemetry.uploader import OtlpHttpExporter


def _state_row(
    device: str, seq: int, state: str, version: str, time_ns: int, boot_id: str = "boot-1"
) -> LogRow:
    attrs = {
        "edge_agent.attr.state": state,
        "edge_agent.attr.package": "digits",
        "edge_agent.attr.version": version,
        "edge_agent.attr.from_version": "1.0.0",
    }
    return LogRow(device, boot_id, seq, time_ns, "event", "ota.state", None, attrs)


def _event_row(device: str, seq: int, boot_id: str = "boot-1") -> LogRow:
    return LogRow(device, boot_id, seq, 10**18 + seq, "event", "daemon.start", '"x"', {"k": seq})


# ---------------------------------------------------------------------------------------
# The same cases on both backends (fleet_store is parametrised: sqlite, postgresql)
# ---------------------------------------------------------------------------------------


def test_ingest_deduplicates_by_device_boot_seq(fleet_store: TelemetryStore) -> None:
    first = fleet_store.insert_logs([_event_row("cam-1", seq) for seq in range(5)])
    assert (first.accepted, first.duplicates) == (5, 0)
    # A retry after a lost acknowledgement resends rows the store already has; a batch may
    # also repeat a row inside itself.
    again = [_event_row("cam-1", s) for s in (2, 3, 4, 5, 5)]
    assert fleet_store.insert_logs(again).accepted == 1
    assert fleet_store.count_rows("logs") == 6
    # The same seq after a reboot (a new boot_id), or from another device, is a new row.
    fresh = [_event_row("cam-1", 0, boot_id="boot-2"), _event_row("cam-2", 0)]
    assert fleet_store.insert_logs(fresh).accepted == 2
    assert fleet_store.count_rows("logs") == 8
    assert fleet_store.known_devices() == ["cam-1", "cam-2"]
    with pytest.raises(UsageError, match="unknown table"):
        fleet_store.count_rows("logs; DROP TABLE logs")


def test_ota_state_rows_are_extracted_once(fleet_store: TelemetryStore) -> None:
    rows = [_state_row("cam-1", 1, "downloading", "1.1.0", 100)]
    rows.append(_state_row("cam-1", 2, "COMMITTED", "1.1.0", 200))
    fleet_store.insert_logs(rows)
    fleet_store.insert_logs(rows)  # duplicates do not add ota_states rows either
    assert fleet_store.count_rows("ota_states") == 2
    assert fleet_store.latest_states("digits", "1.1.0") == {"cam-1": "COMMITTED"}


def test_metrics_deduplicate_even_with_large_attributes(fleet_store: TelemetryStore) -> None:
    # 20 kB of attributes: over PostgreSQL's btree row limit, so its key takes md5(attrs).
    big = {"histogram": "x" * 20_000}
    rows = [MetricRow("cam-1", "fps", 1, 5.0, big), MetricRow("cam-1", "fps", 1, 5.0, {"a": 1})]
    assert fleet_store.insert_metrics(rows).accepted == 2
    again = fleet_store.insert_metrics([*rows, MetricRow("cam-1", "fps", 2, None, big)])
    assert (again.accepted, again.duplicates) == (1, 2)
    assert fleet_store.count_rows("metrics") == 3
    assert fleet_store.known_devices() == ["cam-1"]


def test_rollout_counting_reads_the_newest_state_per_device(fleet_store: TelemetryStore) -> None:
    base_ns = 1_800_000_000 * 10**9
    rows = [
        # a: committed, then a later IDLE (ignored: it says nothing about the install)
        _state_row("a", 1, "DOWNLOADING", "1.1.0", base_ns),
        _state_row("a", 2, "COMMITTED", "1.1.0", base_ns + 10),
        _state_row("a", 3, "IDLE", "1.1.0", base_ns + 20),
        # b: committed then rolled back at the same nanosecond: arrival order decides
        _state_row("b", 1, "COMMITTED", "1.1.0", base_ns + 30),
        _state_row("b", 2, "ROLLED_BACK", "1.1.0", base_ns + 30),
        # c: rejected by the gate; d: still installing; e: another version entirely
        _state_row("c", 1, "REJECTED", "1.1.0", base_ns + 40),
        _state_row("d", 1, "GATING", "1.1.0", base_ns + 50),
        _state_row("e", 1, "COMMITTED", "1.0.0", base_ns - 100),
    ]
    fleet_store.insert_logs(rows)
    assert fleet_store.latest_states("digits", "1.1.0") == {
        "a": "COMMITTED",
        "b": "ROLLED_BACK",
        "c": "REJECTED",
        "d": "GATING",
    }
    assert fleet_store.state_counts("digits") == {
        ("1.1.0", "COMMITTED"): 1,
        ("1.1.0", "ROLLED_BACK"): 1,
        ("1.1.0", "REJECTED"): 1,
        ("1.1.0", "GATING"): 1,
        ("1.0.0", "COMMITTED"): 1,
    }
    times, series = fleet_store.version_timeline("digits", points=3, now_ns=base_ns + 100)
    assert times == [base_ns - 100, base_ns, base_ns + 100]
    # e on 1.0.0 from the start; a on 1.1.0 after +10; b back to its from_version 1.0.0.
    assert series == {"1.0.0": [1, 1, 2], "1.1.0": [0, 0, 1]}


def test_controller_counts_match_on_both_backends(
    tmp_path: Path, operator_keys: list[OperatorKey], fleet_store: TelemetryStore
) -> None:
    base = tmp_path / "repo"
    init_repo(base, operator_keys, release_threshold=2)
    release = [k for k in operator_keys if k.role == "release"]
    publish_package(base, build_package(tmp_path / "p", release, version="1.1.0"), operator_keys)
    start_rollout(base, "stable", "1.1.0", operator_keys, RolloutPolicy(), "digits")
    # At the 10 % stage, so three members are sure to exist among 400 devices.
    state = promote(base, "stable", operator_keys)
    devices = [f"dev-{i:03d}" for i in range(400)]
    fleet_store.insert_logs([_event_row(d, 0) for d in devices])
    members = [d for d in devices if is_member(d, state.salt, 10.0)]
    assert len(members) >= 3
    fleet_store.insert_logs(
        [
            _state_row(members[0], 1, "COMMITTED", "1.1.0", 5),
            _state_row(members[1], 1, "REJECTED", "1.1.0", 5),
            _state_row(members[2], 1, "VERIFYING", "1.1.0", 5),
        ]
    )
    # The devices' own clocks say 5 ns after 1970; the server's receipt time is what counts.
    counts = count_reports(state, fleet_store)
    assert (counts.committed, counts.failed, counts.in_progress) == (1, 1, 1)
    assert counts.members_known == len(members)


def test_concurrent_overlapping_batches_store_each_row_once(fleet_store: TelemetryStore) -> None:
    rows = [_event_row("cam-1", seq) for seq in range(120)]
    accepted: list[int] = []
    errors: list[BaseException] = []

    def send(offset: int) -> None:
        try:
            # Each sender goes through the rows in its own order, in batches of 40.
            mine = rows[offset:] + rows[:offset]
            for i in range(0, len(mine), 40):
                accepted.append(fleet_store.insert_logs(mine[i : i + 40]).accepted)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n * 30,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(accepted) == 120
    assert fleet_store.count_rows("logs") == 120


# ---------------------------------------------------------------------------------------
# Payloads that neither backend could store are refused while parsing (400, not 503)
# ---------------------------------------------------------------------------------------


def _log_payload(attributes: list[dict[str, object]]) -> dict[str, object]:
    ids = [
        {"key": "edge_agent.device_id", "value": {"stringValue": "cam-1"}},
        {"key": "edge_agent.boot_id", "value": {"stringValue": "b"}},
    ]
    record = {"timeUnixNano": "1", "attributes": ids + attributes}
    return {"resourceLogs": [{"scopeLogs": [{"logRecords": [record]}]}]}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_log_payload([{"key": "edge_agent.seq", "value": {"intValue": str(2**63)}}]), "seq"),
        (_log_payload([{"key": "edge_agent.seq", "value": {"intValue": "-1"}}]), "seq"),
        (
            _log_payload(
                [
                    {"key": "edge_agent.seq", "value": {"intValue": "1"}},
                    {"key": "event.name", "value": {"stringValue": "ota\x00state"}},
                ]
            ),
            "NUL",
        ),
    ],
)
def test_unstorable_values_are_bad_payloads(payload: object, message: str) -> None:
    with pytest.raises(BadPayloadError, match=message):
        parse_otlp_logs(payload)


def test_metric_name_with_nul_and_huge_time_are_bad_payloads() -> None:
    def metric(name: str, time_ns: str) -> dict[str, object]:
        point = {
            "timeUnixNano": time_ns,
            "asDouble": 1.0,
            "attributes": [{"key": "edge_agent.device_id", "value": {"stringValue": "cam-1"}}],
        }
        m = {"name": name, "gauge": {"dataPoints": [point]}}
        return {"resourceMetrics": [{"scopeMetrics": [{"metrics": [m]}]}]}

    assert len(parse_otlp_metrics(metric("fps", "5"))) == 1
    with pytest.raises(BadPayloadError, match="NUL"):
        parse_otlp_metrics(metric("f\x00ps", "5"))
    with pytest.raises(BadPayloadError, match="timeUnixNano"):
        parse_otlp_metrics(metric("fps", str(2**64)))


# ---------------------------------------------------------------------------------------
# PostgreSQL only: URLs, reconnects, two servers on one database
# ---------------------------------------------------------------------------------------


def test_postgres_store_survives_a_server_restart(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    store = open_store(postgres_url)
    try:
        assert store.insert_logs([_event_row("cam-1", 1)]).accepted == 1
        # The pooled connection dies with the server; the next call reconnects and retries.
        postgres_server.restart()
        assert store.insert_logs([_event_row("cam-1", 1), _event_row("cam-1", 2)]).accepted == 1
        assert store.count_rows("logs") == 2
    finally:
        store.close()


def test_postgres_store_errors_name_the_server_not_the_password(
    postgres_server: PostgresServer,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(TelemetryError, match="cannot connect") as err:
        open_store(f"postgresql://edge:s3cret@127.0.0.1:{closed_port}/fleet")
    assert "s3cret" not in str(err.value) and f"127.0.0.1:{closed_port}" in str(err.value)
    with pytest.raises(UsageError, match="not a valid PostgreSQL URL") as bad:
        open_store("postgresql://edge:s3cret@127.0.0.1/fleet?bogus=1")
    assert "s3cret" not in str(bad.value) and "edge:***@127.0.0.1" in str(bad.value)
    with pytest.raises(TelemetryError, match="does not exist"):
        open_store(postgres_server.url("no_such_database"))


def test_two_servers_create_the_schema_at_once(postgres_url: str) -> None:
    stores: list[TelemetryStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(open_store(postgres_url))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors, errors
        stores[0].insert_logs([_event_row("cam-1", 1)])
        assert [s.count_rows("logs") for s in stores] == [1, 1, 1]
    finally:
        for s in stores:
            s.close()


# ---------------------------------------------------------------------------------------
# `edge-agent serve --db postgresql://...` end to end
# ---------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "agent.cli"]


def test_serve_ingests_into_postgres_and_promotes(
    tmp_path: Path, operator_keys: list[OperatorKey], postgres_url: str
) -> None:
    base = tmp_path / "repo"
    init_repo(base, operator_keys, release_threshold=2)
    release = [k for k in operator_keys if k.role == "release"]
    publish_package(base, build_package(tmp_path / "p", release, version="1.1.0"), operator_keys)
    policy = RolloutPolicy(soak_s=0, min_devices=2)
    state = start_rollout(base, "stable", "1.1.0", operator_keys, policy, package="digits")
    canaries = [d for d in (f"cam-{i}" for i in range(5000)) if is_member(d, state.salt, 1.0)][:2]
    tokens_path = tmp_path / "tokens.json"
    tokens = {d: add_device_token(tokens_path, d) for d in canaries}
    ops = {"Authorization": f"Bearer {add_operator_token(tokens_path, 'ops')}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [*CLI, "serve", "--repo", str(base), "--db", postgres_url, "--tokens", str(tokens_path)]
    cmd += ["--keys", str(tmp_path / "keys"), "--port", str(port), "--controller-interval-s", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        now = time.time_ns()
        for device in canaries:
            exporter = OtlpHttpExporter(url, headers={"Authorization": f"Bearer {tokens[device]}"})
            batch = [
                ota_record(device, 1, "DOWNLOADING", "1.1.0", now),
                ota_record(device, 2, "COMMITTED", "1.1.0", now + 1),
            ]
            assert exporter.send(batch).outcome == "acked"
        # A resend is acknowledged and counted as duplicates, straight from PostgreSQL.
        body = otlp.logs_request(batch)
        headers = {"Authorization": f"Bearer {tokens[canaries[-1]]}"}
        answer = requests.post(f"{url}/v1/logs", json=body, headers=headers, timeout=10)
        assert answer.status_code == 200
        assert (answer.json()["accepted"], answer.json()["duplicates"]) == (0, 2)
        # The controller inside the server reads the reports from PostgreSQL and promotes.
        deadline = time.monotonic() + 60
        while (
            requests.get(f"{url}/api/rollouts/stable", headers=ops, timeout=5).json()["stage"] < 1
        ):
            assert time.monotonic() < deadline, "controller did not promote"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    status_cmd = [*CLI, "rollout", "status", "--channel", "stable", "--repo", str(base)]
    out = subprocess.run(
        [*status_cmd, "--db", postgres_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["percent"] == 10.0 and status["committed"] == 2
    store = open_store(postgres_url)
    try:
        assert store.count_rows("logs") == 4 and store.count_rows("ota_states") == 4
    finally:
        store.close()


def test_the_base_store_imports_no_backend_and_old_paths_still_work() -> None:
    # A fresh interpreter: in this one the backends are already imported by other tests.
    code = (
        "import sys\n"
        "import agent.fleet.store as base\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('agent.fleet.store_'))\n"
        "print('loaded', loaded)\n"
        "from agent.fleet.store import SQLiteTelemetryStore, open_store, parse_otlp_logs\n"
        "from agent.fleet.store_sqlite import SQLiteTelemetryStore as direct\n"
        "assert SQLiteTelemetryStore is direct and issubclass(direct, base.TelemetryStore)\n"
        "from agent.fleet import ingest, open_store as factory\n"
        "assert open_store is factory.open_store and parse_otlp_logs is ingest.parse_otlp_logs\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["loaded []", "ok"]
