"""The controller counts only its stage: members' reports received after they joined it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fleet_testlib import build_package

from agent.fleet.ingest import LogRow
from agent.fleet.keys import OperatorKey
from agent.fleet.repo import init_repo, load_repo, publish_package, read_channel
from agent.fleet.rollout import (
    RolloutPolicy,
    count_reports,
    is_member,
    load_state,
    promote,
    run_controller_once,
    stage_start_times_s,
    start_rollout,
)
from agent.fleet.store import TelemetryStore
from agent.ota.membership import in_rollout

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
# Puts three of dev-000..dev-299 into the 1 % stage (tests/fleet/test_rollout.py uses it too).
SALT = "0123456789abcdef"
DEVICES = [f"dev-{i:03d}" for i in range(300)]
POLICY = RolloutPolicy(soak_s=600, min_devices=2, max_failure_rate=0.1)
# The operator promotes to 10 % this long after the start in the rows at stage 1.
STAGE_1_AT_S = 1000.0


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
    """Reports sent by two devices of one group: the state, when the server received them
    (seconds after the rollout started) and the time their own clocks claim."""

    group: str
    state: str
    received_after_start_s: float
    claimed_after_start_s: float | None = None  # None: the device's clock matches


@dataclass(frozen=True)
class Row:
    id: str
    attacker_controls: str
    stage: int
    reports: tuple[Report, ...]
    decide_after_start_s: float
    action: str
    committed: int
    failed: int


ROWS = [
    Row(
        "outsider-reports-failure-no-abort",
        "devices outside the stage, with valid tokens, report the release failed",
        stage=0,
        reports=(Report("outsider", "REJECTED", 30), Report("outsider", "ROLLED_BACK", 40)),
        decide_after_start_s=60,
        action="wait",
        committed=0,
        failed=0,
    ),
    Row(
        "outsider-reports-success-no-promote",
        "devices outside the stage report the release committed, then the soak passes",
        stage=0,
        reports=(Report("outsider", "COMMITTED", 30),),
        decide_after_start_s=700,
        action="wait",
        committed=0,
        failed=0,
    ),
    Row(
        "member-pre-stage-report-ignored",
        "members' reports that reached the server before the rollout started, dated after it",
        stage=0,
        reports=(Report("canary", "COMMITTED", -60, claimed_after_start_s=30),),
        decide_after_start_s=700,
        action="wait",
        committed=0,
        failed=0,
    ),
    Row(
        "member-pre-stage-failure-ignored",
        "members' failure reports that reached the server before the rollout started",
        stage=0,
        reports=(Report("canary", "REJECTED", -60),),
        decide_after_start_s=60,
        action="wait",
        committed=0,
        failed=0,
    ),
    Row(
        "newcomer-report-from-before-it-joined-ignored",
        "10 % members reported failures during the 1 % stage, while they were outsiders",
        stage=1,
        reports=(Report("canary", "COMMITTED", 30), Report("newcomer", "REJECTED", 500)),
        decide_after_start_s=STAGE_1_AT_S + 60,
        action="wait",
        committed=2,
        failed=0,
    ),
    Row(
        "members-failures-abort",
        "nothing: two members of the stage fail the gate",
        stage=0,
        reports=(Report("canary", "REJECTED", 30),),
        decide_after_start_s=60,
        action="abort",
        committed=0,
        failed=2,
    ),
    Row(
        "members-failures-abort-whatever-their-clocks-say",
        "members' clocks claim their failures came a day before the rollout",
        stage=0,
        reports=(Report("canary", "ROLLED_BACK", 30, claimed_after_start_s=-86400),),
        decide_after_start_s=60,
        action="abort",
        committed=0,
        failed=2,
    ),
    Row(
        "members-successes-wait-while-soaking",
        "nothing: two members commit, the soak is not over",
        stage=0,
        reports=(Report("canary", "COMMITTED", 30),),
        decide_after_start_s=300,
        action="wait",
        committed=2,
        failed=0,
    ),
    Row(
        "members-successes-promote-after-soak",
        "nothing: two members commit and the soak passes",
        stage=0,
        reports=(Report("canary", "COMMITTED", 30),),
        decide_after_start_s=600,
        action="promote",
        committed=2,
        failed=0,
    ),
    Row(
        "outsiders-failing-cannot-outvote-members",
        "outsiders report failures while the members commit",
        stage=0,
        reports=(Report("outsider", "REJECTED", 20), Report("canary", "COMMITTED", 30)),
        decide_after_start_s=600,
        action="promote",
        committed=2,
        failed=0,
    ),
    Row(
        "canaries-carry-into-the-next-stage",
        "nothing: canaries committed at 1 %, newcomers commit at 10 %, the soak passes",
        stage=1,
        reports=(
            Report("canary", "COMMITTED", 30),
            Report("newcomer", "COMMITTED", STAGE_1_AT_S + 30),
        ),
        decide_after_start_s=STAGE_1_AT_S + 600,
        action="promote",
        committed=4,
        failed=0,
    ),
    Row(
        "newcomers-failing-after-they-joined-abort",
        "nothing: two devices taken in at 10 % fail after the promotion",
        stage=1,
        reports=(Report("newcomer", "REJECTED", STAGE_1_AT_S + 30),),
        decide_after_start_s=STAGE_1_AT_S + 60,
        action="abort",
        committed=0,
        failed=2,
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


def _send(store: TelemetryStore, report: Report, seq: int) -> None:
    for device in _group(report.group)[:2]:
        claimed = report.claimed_after_start_s
        claimed_s = report.received_after_start_s if claimed is None else claimed
        attrs = {
            "edge_agent.attr.state": report.state,
            "edge_agent.attr.package": "digits",
            "edge_agent.attr.version": "1.1.0",
            "edge_agent.attr.from_version": "1.0.0",
        }
        time_ns = max(0, int((T0.timestamp() + claimed_s) * 1e9))
        row = LogRow(device, "boot-1", seq, time_ns, "event", "ota.state", None, attrs)
        store.insert_logs([row], now_s=T0.timestamp() + report.received_after_start_s)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_controller_counts_only_its_stage(
    row: Row, repo: Path, operator_keys: list[OperatorKey], fleet_store: TelemetryStore
) -> None:
    # The whole fleet said hello before the rollout, so every member is known.
    hello_s = T0.timestamp() - 3600
    fleet_store.insert_logs(
        [LogRow(d, "boot-0", 0, 0, "event", "daemon.start", None, {}) for d in DEVICES],
        now_s=hello_s,
    )
    start_rollout(repo, "stable", "1.1.0", operator_keys, POLICY, "digits", SALT, now=T0)
    for kind in ("canary", "newcomer", "outsider"):
        assert len(_group(kind)) >= 2, f"SALT leaves fewer than two {kind}s"
    # Reports arrive in time order; the operator promotes to 10 % at STAGE_1_AT_S.
    promoted = False
    for seq, report in enumerate(sorted(row.reports, key=lambda r: r.received_after_start_s), 1):
        if row.stage == 1 and not promoted and report.received_after_start_s >= STAGE_1_AT_S:
            promote(repo, "stable", operator_keys, now=T0 + timedelta(seconds=STAGE_1_AT_S))
            promoted = True
        _send(fleet_store, report, seq)
    if row.stage == 1 and not promoted:
        promote(repo, "stable", operator_keys, now=T0 + timedelta(seconds=STAGE_1_AT_S))
    assert load_state(repo, "stable").stage == row.stage

    now = T0 + timedelta(seconds=row.decide_after_start_s)
    [decision] = run_controller_once(repo, fleet_store, operator_keys, now=now)
    assert (decision.action, decision.committed, decision.failed) == (
        row.action,
        row.committed,
        row.failed,
    ), f"{row.attacker_controls}: {decision.describe()}"
    # The decision was applied to the signed channel document the devices follow.
    doc = read_channel(load_repo(repo), "stable")
    assert doc is not None
    assert doc["rollout"]["aborted"] is (row.action == "abort")
    stages = POLICY.stages_percent
    expected_stage = row.stage + 1 if row.action == "promote" else row.stage
    assert doc["rollout"]["percent"] == stages[expected_stage]


def test_members_known_counts_only_the_stage_and_matches_the_device_rule(
    repo: Path, operator_keys: list[OperatorKey], fleet_store: TelemetryStore
) -> None:
    fleet_store.insert_logs(
        [LogRow(d, "boot-0", 0, 0, "event", "daemon.start", None, {}) for d in DEVICES]
    )
    state = start_rollout(repo, "stable", "1.1.0", operator_keys, POLICY, "digits", SALT, now=T0)
    # The controller's membership is the device's own rule (agent/ota/membership.py).
    members = [d for d in DEVICES if in_rollout(d, SALT, state.percent)]
    assert count_reports(state, fleet_store).members_known == len(members)
    state = promote(repo, "stable", operator_keys, now=T0 + timedelta(seconds=STAGE_1_AT_S))
    members = [d for d in DEVICES if in_rollout(d, SALT, state.percent)]
    assert count_reports(state, fleet_store).members_known == len(members)
    assert stage_start_times_s(state) == [T0.timestamp(), T0.timestamp() + STAGE_1_AT_S]
