"""The controller stops a release on the quality figures its stage's members report."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fleet_testlib import build_package

from agent.errors import ConfigError
from agent.fleet.ingest import LogRow, parse_otlp_logs
from agent.fleet.keys import OperatorKey
from agent.fleet.page import DeviceFilter, render_overview, render_rollout_page
from agent.fleet.repo import init_repo, load_repo, publish_package, read_channel
from agent.fleet.rollout import (
    QualityPolicy,
    RolloutPolicy,
    count_reports,
    is_member,
    load_state,
    promote,
    run_controller_once,
    start_rollout,
)
from agent.fleet.status import rollout_status
from agent.fleet.store import TelemetryStore
from agent.telemetry import otlp

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
# Puts three of dev-000..dev-299 into the 1 % stage (as in test_rollout_stage.py).
SALT = "0123456789abcdef"
DEVICES = [f"dev-{i:03d}" for i in range(300)]
QUALITY = QualityPolicy(
    shadow_agreement_min=0.9,
    confidence_delta_min=-0.1,
    class_hist_distance_max=0.2,
    drift_psi_max=0.25,
    gate_margin_min=0.0,
    latency_p95_ratio_max=1.5,
    fps_ratio_min=0.7,
    error_rate_max=0.02,
    min_devices=2,
    # of the three canaries, one breaching (33 %) is tolerated, two (67 %) abort
    max_breaching_pct=34.0,
)
POLICY = RolloutPolicy(soak_s=600, min_devices=2, max_failure_rate=0.5, quality=QUALITY)
STAGE_1_AT_S = 1000.0
GOOD = {
    "shadow_agreement": 0.99,
    "confidence_delta": 0.0,
    "class_hist_distance": 0.02,
    "drift_psi": 0.05,
    "gate_margin": 0.01,
    "latency_p95_ms": 2.1,
    "fps": 19.5,
    "error_rate": 0.0,
}
OLD = {"latency_p95_ms": 2.0, "fps": 20.0, "error_rate": 0.0}


def _group(kind: str) -> list[str]:
    """canary: in since 1 %; newcomer: in since 10 %, outside at 1 %; outsider: outside 10 %."""
    canaries = [d for d in DEVICES if is_member(d, SALT, 1.0)]
    if kind == "canary":
        return canaries
    tenth = [d for d in DEVICES if is_member(d, SALT, 10.0)]
    if kind == "newcomer":
        return [d for d in tenth if d not in canaries]
    return [d for d in DEVICES if d not in tenth]


@dataclass(frozen=True)
class Report:
    """ota.state reports of ``count`` devices of a group, with quality attributes as the
    wire carries them (a number, or a raw OTLP AnyValue an attacker wrote)."""

    group: str
    state: str
    received_after_start_s: float
    quality: dict[str, Any]
    version: str = "1.1.0"
    count: int = 2
    first: int = 0  # which of the group's devices start the run


@dataclass(frozen=True)
class Row:
    id: str
    attacker_controls: str
    reports: tuple[Report, ...]
    action: str  # the controller's next action
    figure: str | None = None  # the figure that broke (abort) ...
    breaching: int = 0
    reporting: int = 0
    # ... or, without an abort, the reporting / breaching count of this figure
    look_at: str = "shadow_agreement"
    stage: int = 0
    decide_after_start_s: float = 60.0
    old: dict[str, Any] = field(default_factory=lambda: dict(OLD))


def bad(**figures: Any) -> dict[str, Any]:
    return {**GOOD, **figures}


def canaries(quality: dict[str, Any], count: int = 2, first: int = 0) -> Report:
    return Report("canary", "COMMITTED", 30, quality, count=count, first=first)


ROWS = [
    # one row per figure breached by two of the three canaries
    Row(
        "shadow-agreement",
        "nothing",
        (canaries(bad(shadow_agreement=0.1)),),
        "abort",
        "shadow_agreement",
        2,
        2,
    ),
    Row(
        "confidence-delta",
        "nothing",
        (canaries(bad(confidence_delta=-0.4)),),
        "abort",
        "confidence_delta",
        2,
        2,
    ),
    Row(
        "class-hist-distance",
        "nothing",
        (canaries(bad(class_hist_distance=0.7)),),
        "abort",
        "class_hist_distance",
        2,
        2,
    ),
    Row("drift-psi", "nothing", (canaries(bad(drift_psi=1.3)),), "abort", "drift_psi", 2, 2),
    Row(
        "gate-margin", "nothing", (canaries(bad(gate_margin=-0.02)),), "abort", "gate_margin", 2, 2
    ),
    Row(
        "latency-p95-vs-old-release",
        "nothing",
        (canaries(bad(latency_p95_ms=5.0)),),
        "abort",
        "latency_p95_ms",
        2,
        2,
    ),
    Row("fps-vs-old-release", "nothing", (canaries(bad(fps=9.0)),), "abort", "fps", 2, 2),
    Row(
        "error-rate-over-old-release",
        "nothing",
        (canaries(bad(error_rate=0.2)),),
        "abort",
        "error_rate",
        2,
        2,
    ),
    Row(
        "error-rate-as-high-as-before-is-fine",
        "nothing",
        (canaries(bad(error_rate=0.11)),),
        "wait",
        look_at="error_rate",
        reporting=2,
        old={**OLD, "error_rate": 0.1},
    ),
    Row(
        "latency-without-old-figure-not-judged",
        "nothing",
        (canaries(bad(latency_p95_ms=50.0)),),
        "wait",
        look_at="latency_p95_ms",
        old={"fps": 20.0},
    ),
    Row("all-figures-good", "nothing", (canaries(GOOD, count=3),), "wait", reporting=3),
    Row(
        "not-enough-devices",
        "nothing: one canary reports, min_devices is 2",
        (canaries(bad(shadow_agreement=0.1), count=1),),
        "wait",
        breaching=1,
        reporting=1,
    ),
    Row(
        "outsiders-bad-reports-ignored",
        "devices outside the stage report terrible figures for the release",
        (Report("outsider", "COMMITTED", 30, bad(shadow_agreement=0.0), count=5),),
        "wait",
    ),
    Row(
        "reports-before-the-stage-ignored",
        "members' bad reports that reached the server before the rollout started",
        (Report("canary", "COMMITTED", -60, bad(shadow_agreement=0.0)),),
        "wait",
    ),
    Row(
        "newcomers-reports-from-before-they-joined-ignored",
        "10 % members reported bad figures during the 1 % stage, as outsiders",
        (canaries(GOOD, count=3), Report("newcomer", "COMMITTED", 500, bad(shadow_agreement=0.0))),
        "wait",
        reporting=3,
        stage=1,
        decide_after_start_s=STAGE_1_AT_S + 60,
    ),
    Row(
        "one-liar-cannot-abort",
        "one canary reports agreement 0 for a good release",
        (canaries(GOOD, count=2, first=1), canaries(bad(shadow_agreement=0.0), count=1)),
        "wait",
        breaching=1,
        reporting=3,
    ),
    Row(
        "nan-infinity-strings-and-huge-ints-are-no-figures",
        "two canaries send NaN, Infinity, a string, a bool and a 400-digit integer",
        (
            canaries(
                {
                    "shadow_agreement": {"doubleValue": "NaN"},
                    "confidence_delta": {"doubleValue": "-Infinity"},
                    "drift_psi": {"stringValue": "0.1"},
                    "gate_margin": {"boolValue": False},
                    "error_rate": {"intValue": "9" * 400},
                    "fps": {"doubleValue": "1e999"},
                }
            ),
        ),
        "wait",
        look_at="shadow_agreement",
    ),
    Row(
        "out-of-range-values-are-no-figures",
        "two canaries claim agreement 1e300 and -5, and a p95 of 1e308 against an old 1e-300",
        (
            canaries(bad(shadow_agreement=1e300, latency_p95_ms=1e308), count=1),
            canaries(bad(shadow_agreement=-5.0), count=1, first=1),
        ),
        "wait",
        look_at="shadow_agreement",
        old={"latency_p95_ms": 1e-300},
    ),
    Row(
        "liar-garbage-does-not-hide-honest-breaches",
        "one canary sends garbage figures while two honest ones breach",
        (
            canaries(bad(shadow_agreement=0.2), count=2),
            canaries({"shadow_agreement": {"doubleValue": "NaN"}}, count=1, first=2),
        ),
        "abort",
        "shadow_agreement",
        2,
        2,
    ),
    Row(
        "liar-cannot-outvote-a-whole-stage-of-breaches",
        "one canary claims perfect agreement while the two others breach",
        (
            canaries(bad(shadow_agreement=0.2), count=2),
            canaries(bad(shadow_agreement=1.0), count=1, first=2),
        ),
        "abort",
        "shadow_agreement",
        2,
        3,
    ),
    # (the failures abort it first; their figures are counted all the same)
    Row(
        "rolled-back-reports-count-too",
        "nothing: two canaries roll back with their figures",
        (Report("canary", "ROLLED_BACK", 30, bad(shadow_agreement=0.3)),),
        "abort",
        breaching=2,
        reporting=2,
    ),
]


@pytest.fixture()
def repo(tmp_path: Path, operator_keys: list[OperatorKey]) -> Path:
    base = tmp_path / "repo"
    release = [k for k in operator_keys if k.role == "release"]
    init_repo(base, operator_keys, release_threshold=2, now=T0)
    pkg = build_package(tmp_path / "p", release, version="1.1.0", release_counter=2)
    publish_package(base, pkg, operator_keys, now=T0)
    return base


def _value(raw: Any) -> dict[str, Any]:
    return raw if isinstance(raw, dict) else otlp.any_value(raw)


def _send(store: TelemetryStore, report: Report, seq: int, received_s: float) -> None:
    """Each device's report as OTLP/JSON through the server's own parser, then stored."""
    devices = _group(report.group)[report.first : report.first + report.count]
    assert len(devices) == report.count
    for device in devices:
        attrs = {
            "edge_agent.device_id": device,
            "edge_agent.boot_id": "boot-1",
            "edge_agent.seq": seq,
            "event.name": "ota.state",
            "edge_agent.attr.state": report.state,
            "edge_agent.attr.package": "digits",
            "edge_agent.attr.version": report.version,
            "edge_agent.attr.from_version": "1.0.0" if report.version != "1.0.0" else "",
        }
        wire = [{"key": k, "value": otlp.any_value(v)} for k, v in attrs.items()]
        wire += [
            {"key": f"edge_agent.attr.quality.{k}", "value": _value(v)}
            for k, v in report.quality.items()
        ]
        time_ns = int((T0.timestamp() + report.received_after_start_s) * 1e9)
        body = {
            "resourceLogs": [
                {
                    "scopeLogs": [
                        {"logRecords": [{"timeUnixNano": str(max(0, time_ns)), "attributes": wire}]}
                    ]
                }
            ]
        }
        store.insert_logs(parse_otlp_logs(json.loads(json.dumps(body))), now_s=received_s)


def _run_row(row: Row, repo: Path, keys: list[OperatorKey], store: TelemetryStore) -> Any:
    hello_s = T0.timestamp() - 7200
    store.insert_logs(
        [LogRow(d, "boot-0", 0, 0, "event", "daemon.start", None, {}) for d in DEVICES],
        now_s=hello_s,
    )
    # The devices committed the old release a day earlier, with its figures there.
    for group in ("canary", "newcomer", "outsider"):
        count = min(5, len(_group(group)))
        old = Report(group, "COMMITTED", -86400, row.old, version="1.0.0", count=count)
        _send(store, old, 0, T0.timestamp() - 86400)
    start_rollout(repo, "stable", "1.1.0", keys, POLICY, "digits", SALT, now=T0)
    promoted = False
    for seq, report in enumerate(sorted(row.reports, key=lambda r: r.received_after_start_s), 1):
        at_s = report.received_after_start_s
        if row.stage == 1 and not promoted and at_s >= STAGE_1_AT_S:
            promote(repo, "stable", keys, now=T0 + timedelta(seconds=STAGE_1_AT_S))
            promoted = True
        _send(store, report, seq, T0.timestamp() + at_s)
    if row.stage == 1 and not promoted:
        promote(repo, "stable", keys, now=T0 + timedelta(seconds=STAGE_1_AT_S))
    assert load_state(repo, "stable").stage == row.stage
    now = T0 + timedelta(seconds=row.decide_after_start_s)
    return now


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_controller_stops_a_release_on_quality(
    row: Row, repo: Path, operator_keys: list[OperatorKey], fleet_store: TelemetryStore
) -> None:
    now = _run_row(row, repo, operator_keys, fleet_store)
    for kind in ("canary", "newcomer", "outsider"):
        assert len(_group(kind)) >= 3, f"SALT leaves fewer than three {kind}s"
    counts = count_reports(load_state(repo, "stable"), fleet_store)
    [decision] = run_controller_once(repo, fleet_store, operator_keys, now=now)
    why = f"{row.attacker_controls}: {decision.describe()} {counts.quality}"
    assert decision.action == row.action, why
    doc = read_channel(load_repo(repo), "stable")
    assert doc is not None
    assert doc["rollout"]["aborted"] is (row.action == "abort"), why
    if row.figure is not None:
        assert decision.breached is not None, why
        assert (decision.breached.figure, decision.breached.breaching) == (
            row.figure,
            row.breaching,
        ), why
        assert decision.breached.reporting == row.reporting, why
        assert row.figure in decision.reason and f"{row.breaching} of {row.reporting}" in (
            decision.reason
        ), why
        # The abort is kept with the figure and its numbers, for status and the page.
        status = rollout_status(load_state(repo, "stable"), fleet_store, now)
        assert status["aborted"] is True
        assert status["quality_abort"]["figure"] == row.figure
        assert (status["quality_abort"]["breaching"], status["quality_abort"]["reporting"]) == (
            row.breaching,
            row.reporting,
        )
        assert status["quality_abort"]["stage"] == row.stage
    else:
        assert decision.breached is None, why
        [looked] = [f for f in counts.quality if f.figure == row.look_at]
        assert (looked.breaching, looked.reporting) == (row.breaching, row.reporting), why


def test_no_quality_checks_read_nothing_and_change_nothing(
    repo: Path, operator_keys: list[OperatorKey], fleet_store: TelemetryStore
) -> None:
    """A policy without a quality section: figures are stored but never judged."""
    fleet_store.insert_logs(
        [LogRow(d, "boot-0", 0, 0, "event", "daemon.start", None, {}) for d in DEVICES],
        now_s=T0.timestamp() - 60,
    )
    start_rollout(
        repo, "stable", "1.1.0", operator_keys, RolloutPolicy(soak_s=600), "digits", SALT, now=T0
    )
    _send(fleet_store, canaries(bad(shadow_agreement=0.0), count=3), 1, T0.timestamp() + 30)
    assert fleet_store.count_rows("ota_quality") == 3 * len(GOOD)
    [decision] = run_controller_once(
        repo, fleet_store, operator_keys, now=T0 + timedelta(seconds=601)
    )
    assert decision.action == "promote", decision.describe()


def test_resent_report_stores_its_figures_once(fleet_store: TelemetryStore) -> None:
    report = canaries(GOOD, count=1)
    _send(fleet_store, report, 7, T0.timestamp())
    _send(fleet_store, report, 7, T0.timestamp() + 5)  # the device's retry after a lost ack
    assert fleet_store.count_rows("ota_quality") == len(GOOD)
    rows = fleet_store.quality_reports("digits", ["1.1.0"])
    assert {r.name for r in rows} == set(GOOD)
    assert all(r.received_s == T0.timestamp() for r in rows)


@pytest.fixture()
def aborted_on_quality(
    tmp_path: Path, repo: Path, operator_keys: list[OperatorKey]
) -> tuple[Path, Path]:
    from agent.fleet.store_sqlite import SQLiteTelemetryStore

    db = tmp_path / "fleet.db"
    store = SQLiteTelemetryStore(db)
    try:
        row = ROWS[0]
        now = _run_row(row, repo, operator_keys, store)
        [decision] = run_controller_once(repo, store, operator_keys, now=now)
        assert decision.action == "abort"
    finally:
        store.close()
    return repo, db


def test_rollout_status_cli_names_the_figure_and_devices(
    aborted_on_quality: tuple[Path, Path],
) -> None:
    repo, db = aborted_on_quality
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "rollout",
            "status",
            "--channel",
            "stable",
            "--repo",
            str(repo),
            "--db",
            str(db),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "(aborted)" in out
    assert "aborted at stage 1 (1%) on quality: shadow_agreement broke on 2 of 2" in out, out
    line = next(x for x in out.splitlines() if x.startswith("shadow_agreement"))
    assert line.split()[:4] == ["shadow_agreement", ">=", "0.9", "2"], line


def test_status_pages_name_the_figure(
    aborted_on_quality: tuple[Path, Path],
) -> None:
    from agent.fleet.store_sqlite import SQLiteTelemetryStore

    repo, db = aborted_on_quality
    store = SQLiteTelemetryStore(db)
    try:
        state = load_state(repo, "stable")
        now = T0 + timedelta(seconds=120)
        status = rollout_status(state, store, now)
        overview = render_overview([status], [""], [], DeviceFilter())
        rollout_page = render_rollout_page(state, status, store, now)
    finally:
        store.close()
    for html in (overview, rollout_page):
        assert "on quality: <strong>shadow_agreement</strong> broke on 2 of 2 reporting" in html
        assert 'data-figure="shadow_agreement"' in html


def test_policy_file_sets_the_quality_section(tmp_path: Path) -> None:
    """`rollout start --policy FILE`: the quality thresholds come from the channel policy,
    flags override the file, and a bad key is named with its path."""
    from agent.commands.fleet import _policy  # the CLI's own reading of the flags and file

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "stages_percent: [1, 10, 100]\nsoak_s: 900\n"
        "quality: {shadow_agreement_min: 0.9, min_devices: 3, max_breaching_pct: 20}\n"
    )
    args = _args(policy=policy_file, soak_s=60.0)
    policy = _policy(args)
    assert policy.soak_s == 60.0 and policy.stages_percent == (1.0, 10.0, 100.0)
    assert policy.quality.shadow_agreement_min == 0.9 and policy.quality.min_devices == 3
    policy_file.write_text("quality: {shadow_agreement: 0.9}\n")
    with pytest.raises(ConfigError, match=r"policy.yaml:quality.shadow_agreement: unknown key"):
        _policy(_args(policy=policy_file))
    policy_file.write_text("quality: {drift_psi_max: .nan}\n")
    with pytest.raises(ConfigError, match=r"policy.yaml:quality: drift_psi_max: must be a finite"):
        _policy(_args(policy=policy_file))


def _args(**given: Any) -> Any:
    import argparse

    values = {
        "policy": None,
        "stages": None,
        "soak_s": None,
        "min_devices": None,
        "max_failure_rate": None,
        "no_auto_promote": False,
        "no_auto_abort": False,
        **given,
    }
    return argparse.Namespace(**values)
