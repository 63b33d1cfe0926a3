"""Rollout controller: the decision table over counts and times, and runs on a fake clock."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fleet_testlib import build_package

from agent.errors import UsageError
from agent.fleet.ingest import LogRow
from agent.fleet.keys import OperatorKey
from agent.fleet.repo import init_repo, load_repo, publish_package, read_channel
from agent.fleet.rollout import (
    RolloutPolicy,
    StageCounts,
    abort,
    decide,
    is_member,
    load_state,
    member_bucket,
    promote,
    run_controller_once,
    set_paused,
    start_rollout,
)
from agent.fleet.store import TelemetryStore

POLICY = RolloutPolicy(
    stages_percent=(1.0, 10.0, 100.0), soak_s=600.0, min_devices=3, max_failure_rate=0.1
)


@pytest.mark.parametrize(
    ("stage", "elapsed_s", "counts", "flags", "action", "reason_part"),
    [
        # not enough reports yet
        (0, 9999, StageCounts(committed=2, members_known=5), {}, "wait", "2 of 3"),
        # enough reports, still soaking
        (0, 599, StageCounts(committed=3, members_known=5), {}, "wait", "soaking"),
        # soaked with enough reports: promote
        (0, 600, StageCounts(committed=3, members_known=5), {}, "promote", "soaked"),
        # a small stage: required reports capped at the known members
        (0, 600, StageCounts(committed=1, members_known=1), {}, "promote", "soaked"),
        # nobody known in the stage: wait, never promote blind
        (0, 9999, StageCounts(members_known=0), {}, "wait", "no known device"),
        # one failure among two members: over the whole-stage budget at once (before soak)
        (0, 5, StageCounts(failed=1, members_known=2), {}, "abort", "failure rate"),
        # rate over threshold once enough reports are in
        (1, 5, StageCounts(committed=8, failed=2, members_known=50), {}, "abort", "failure"),
        # rate at the threshold exactly is still fine
        (1, 600, StageCounts(committed=9, failed=1, members_known=10), {}, "promote", "soaked"),
        # one early failure in a large stage is not yet over budget or rate (1 report < 3)
        (2, 5, StageCounts(failed=1, in_progress=5, members_known=100), {}, "wait", "1 of 3"),
        # last stage soaked: complete
        (2, 600, StageCounts(committed=100, members_known=100), {}, "complete", "last stage"),
        # paused: hold, even when ready
        (0, 600, StageCounts(committed=3, members_known=3), {"paused": True}, "hold", "paused"),
        # paused but failing: hold and ask a person (no automatic abort while paused)
        (0, 600, StageCounts(failed=3, members_known=3), {"paused": True}, "hold", "by hand"),
        # aborted / completed rollouts take no decisions
        (0, 600, StageCounts(failed=3), {"aborted": True}, "none", "aborted"),
        (2, 600, StageCounts(committed=3), {"completed": True}, "none", "complete"),
        # unknown fleet size: min_devices applies as given
        (0, 600, StageCounts(committed=2), {}, "wait", "2 of 3"),
    ],
)
def test_decide_table(
    stage: int,
    elapsed_s: float,
    counts: StageCounts,
    flags: dict[str, bool],
    action: str,
    reason_part: str,
) -> None:
    decision = decide(POLICY, stage, elapsed_s, counts, **flags)
    assert decision.action == action, decision.describe()
    assert reason_part in decision.reason
    assert decision.failure_rate == pytest.approx(
        counts.failed / (counts.committed + counts.failed)
        if counts.failed + counts.committed
        else 0.0
    )
    assert f"committed={counts.committed}" in decision.describe()


def test_auto_switches_turn_actions_into_holds() -> None:
    manual = RolloutPolicy(soak_s=0, min_devices=1, auto_promote=False, auto_abort=False)
    assert decide(manual, 0, 1, StageCounts(committed=1, members_known=1)).action == "hold"
    assert decide(manual, 0, 1, StageCounts(failed=1, members_known=1)).action == "hold"


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        (RolloutPolicy(stages_percent=(10.0, 1.0, 100.0)), "increase"),
        (RolloutPolicy(stages_percent=(1.0, 10.0)), "last stage"),
        (RolloutPolicy(stages_percent=(0.0, 100.0)), "(0, 100]"),
        (RolloutPolicy(min_devices=0), "min_devices"),
        (RolloutPolicy(max_failure_rate=1.5), "max_failure_rate"),
    ],
)
def test_policy_check(policy: RolloutPolicy, problem: str) -> None:
    assert problem in (policy.check() or "")


def test_membership_matches_contract_formula_and_is_sticky() -> None:
    import hashlib

    salt = "abcd"
    for i in range(200):
        device = f"dev-{i}"
        expected = int(hashlib.sha256(f"{device}:{salt}".encode()).hexdigest()[:8], 16) % 10000
        assert member_bucket(device, salt) == expected
        if is_member(device, salt, 1.0):
            assert is_member(device, salt, 10.0) and is_member(device, salt, 100.0)


# ---------------------------------------------------------------------------------------
# The controller on a real repository and a real store (both backends), with a fake clock
# ---------------------------------------------------------------------------------------

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
# A fixed salt that puts three of dev-000..dev-299 into the 1 % stage: a random one leaves
# the stage empty about one run in twenty.
SALT = "0123456789abcdef"


@pytest.fixture()
def fleet(
    tmp_path: Path, operator_keys: list[OperatorKey], fleet_store: TelemetryStore
) -> tuple[Path, TelemetryStore]:
    """A repository with two releases and a telemetry store (SQLite, then PostgreSQL)."""
    base = tmp_path / "repo"
    release = [k for k in operator_keys if k.role == "release"]
    init_repo(base, operator_keys, release_threshold=2, now=T0)
    for version, counter in (("1.0.0", 1), ("1.1.0", 2)):
        pkg = build_package(tmp_path / "p", release, version=version, release_counter=counter)
        publish_package(base, pkg, operator_keys, now=T0)
    return base, fleet_store


def _report(
    store: TelemetryStore, device: str, seq: int, state: str, version: str, at: datetime
) -> None:
    attrs = {
        "edge_agent.attr.state": state,
        "edge_agent.attr.package": "digits",
        "edge_agent.attr.version": version,
        "edge_agent.attr.from_version": "1.0.0",
    }
    store.insert_logs(
        [
            LogRow(
                device, "boot-1", seq, int(at.timestamp() * 1e9), "event", "ota.state", None, attrs
            )
        ]
    )


def _members(salt: str, percent: float, devices: list[str]) -> list[str]:
    return [d for d in devices if is_member(d, salt, percent)]


def test_controller_promotes_through_stages_then_completes(
    fleet: tuple[Path, TelemetryStore],
    operator_keys: list[OperatorKey],
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, store = fleet
    devices = [f"dev-{i:03d}" for i in range(300)]
    for d in devices:
        store.insert_logs([LogRow(d, "boot-1", 0, 0, "event", "daemon.start", None, {})])
    policy = RolloutPolicy(soak_s=600, min_devices=2, max_failure_rate=0.1)
    state = start_rollout(
        base, "stable", "1.1.0", operator_keys, policy, package="digits", salt=SALT, now=T0
    )
    caplog.set_level(logging.INFO, logger="agent.fleet.rollout")
    now = T0
    for stage, percent in enumerate(policy.stages_percent):
        members = _members(state.salt, percent, devices)
        assert members, "the salt put nobody into this stage"
        # Halfway through the soak the controller waits ...
        now += timedelta(seconds=300)
        for d in members:
            _report(store, d, 1, "COMMITTED", "1.1.0", now)
        [decision] = run_controller_once(base, store, operator_keys, now=now)
        assert decision.action == "wait" and decision.committed == len(members)
        # ... and acts once the soak time has passed.
        now += timedelta(seconds=300)
        [decision] = run_controller_once(base, store, operator_keys, now=now)
        assert decision.action == ("complete" if stage == 2 else "promote")
        doc = read_channel(load_repo(base), "stable")
        assert doc is not None
        assert doc["rollout"]["percent"] == policy.stages_percent[min(stage + 1, 2)]
    final = load_state(base, "stable")
    assert final.completed
    assert [h["action"] for h in final.history] == ["start", "promote", "promote", "complete"]
    assert final.history[1]["committed"] >= 1 and "failure_rate" in final.history[1]
    assert "promote" in caplog.text and "committed=" in caplog.text


def test_controller_aborts_bad_release_at_first_stage_and_reverts(
    fleet: tuple[Path, TelemetryStore],
    operator_keys: list[OperatorKey],
) -> None:
    base, store = fleet
    devices = [f"dev-{i:03d}" for i in range(300)]
    for d in devices:
        store.insert_logs([LogRow(d, "boot-1", 0, 0, "event", "daemon.start", None, {})])
    state = start_rollout(
        base,
        "stable",
        "1.1.0",
        operator_keys,
        RolloutPolicy(soak_s=600, min_devices=2),
        package="digits",
        salt=SALT,
        now=T0,
    )
    canary = _members(state.salt, 1.0, devices)[0]
    _report(store, canary, 1, "REJECTED", "1.1.0", T0 + timedelta(seconds=30))
    [decision] = run_controller_once(base, store, operator_keys, now=T0 + timedelta(seconds=60))
    assert decision.action == "abort"
    doc = read_channel(load_repo(base), "stable")
    assert doc is not None
    assert doc["rollout"]["aborted"] is True
    assert doc["rollout"]["percent"] == 1.0
    assert doc["revert_versions"] == ["1.1.0"]
    entry = load_state(base, "stable").history[-1]
    assert entry["action"] == "abort" and entry["failed"] == 1
    # Nothing more happens on later passes.
    [later] = run_controller_once(base, store, operator_keys, now=T0 + timedelta(hours=5))
    assert later.action == "none"


def test_operator_actions_and_their_refusals(
    fleet: tuple[Path, TelemetryStore],
    operator_keys: list[OperatorKey],
) -> None:
    base, _ = fleet
    with pytest.raises(UsageError, match="say which package"):
        start_rollout(base, "stable", "9.9.9", operator_keys)
    start_rollout(base, "stable", "1.0.0", operator_keys, package="digits", now=T0)
    with pytest.raises(UsageError, match="does not match channel"):
        start_rollout(base, "stable", "1.1.0", operator_keys, package="other", now=T0)
    with pytest.raises(UsageError, match="not newer"):
        start_rollout(base, "stable", "1.0.0", operator_keys, package="digits", now=T0)
    set_paused(base, "stable", True, operator_keys, now=T0)
    doc = read_channel(load_repo(base), "stable")
    assert doc is not None and doc["rollout"]["paused"] is True
    with pytest.raises(UsageError, match="already paused"):
        set_paused(base, "stable", True, operator_keys, now=T0)
    set_paused(base, "stable", False, operator_keys, now=T0)
    assert promote(base, "stable", operator_keys, now=T0).percent == 10.0
    abort(base, "stable", operator_keys, now=T0)
    with pytest.raises(UsageError, match="aborted"):
        promote(base, "stable", operator_keys, now=T0)
    # A new release on the channel starts over with a fresh salt.
    old_salt = load_state(base, "stable").salt
    state = start_rollout(base, "stable", "1.1.0", operator_keys, now=T0)
    assert state.stage == 0 and state.salt != old_salt and not state.aborted
    saved = json.loads((base / "rollouts" / "stable.json").read_text())
    assert saved["version"] == "1.1.0"
