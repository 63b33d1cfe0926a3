"""Recovery on start, row by row: agent/ota/recovery.py plan_recovery is pure, so every
state and counter combination is one row here; the kill-point tests carry the plans out."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.ota.recovery import Facts, Plan, Step, plan_recovery
from agent.ota.states import AT_REST, OTAState

S = OTAState


@dataclass(frozen=True)
class Row:
    """What the journal and links say at start (the fault left them so) -> what happens."""

    id: str
    facts: Facts
    step: Step
    next_state: OTAState | None = None
    attempts: int | None = None
    refused: bool = False


ROWS = [
    Row("empty-journal", Facts(None), Step.NOTHING),
    *[Row(f"at-rest-{s.value}", Facts(s, "1.1.0"), Step.NOTHING) for s in sorted(AT_REST)],
    Row(
        "rollback-switched-links-but-row-lost",
        Facts(S.COMMITTED, "1.1.0", silent_switch=True),
        Step.RECORD_ROLLBACK,
    ),
    Row(
        "probation-rollback-row-lost",
        Facts(S.PROBATION, "1.1.0", silent_switch=True),
        Step.RECORD_ROLLBACK,
    ),
    Row(
        "probation-restart-1",
        Facts(S.PROBATION, "1.1.0", restarts=0),
        Step.PROBATION_RESTART,
        S.PROBATION,
    ),
    Row(
        "probation-cli-is-not-a-restart",
        Facts(S.PROBATION, "1.1.0", restarts=2, agent_start=False),
        Step.PROBATION_RUNNING,
    ),
    Row(
        "probation-crash-loop",
        Facts(S.PROBATION, "1.1.0", restarts=2, crash_loop_limit=3),
        Step.CRASH_LOOP_ROLLBACK,
        S.ROLLED_BACK,
    ),
    Row(
        "probation-breaker-off",
        Facts(S.PROBATION, "1.1.0", restarts=50, crash_loop_limit=0),
        Step.PROBATION_RESTART,
        S.PROBATION,
    ),
    *[
        Row(
            f"killed-in-{s.value}-first-time",
            Facts(s, "1.1.0"),
            Step.RETRY,
            S.IDLE,
            attempts=1,
        )
        for s in (S.CHECKING, S.DOWNLOADING, S.VERIFYING, S.GATING)
    ],
    *[
        Row(
            f"stopped-cleanly-in-{s.value}",
            Facts(s, "1.1.0", attempts=2, clean_stop=True),
            Step.CLEAN_STOP_RETRY,
            S.IDLE,
        )
        for s in (S.CHECKING, S.DOWNLOADING, S.VERIFYING, S.GATING)
    ],
    Row(
        "gate-killed-third-time-refused",
        Facts(S.GATING, "1.1.0", attempts=2, crash_loop_limit=3),
        Step.REFUSE,
        S.REJECTED,
        attempts=3,
        refused=True,
    ),
    Row(
        "check-killed-often-no-version-to-refuse",
        Facts(S.CHECKING, "", attempts=9, crash_loop_limit=3),
        Step.RETRY,
        S.IDLE,
        attempts=10,
    ),
    Row(
        "killed-in-activation",
        Facts(S.ACTIVATING, "1.1.0"),
        Step.UNDO_ACTIVATION,
        S.ROLLED_BACK,
        attempts=1,
    ),
    Row(
        "clean-stop-does-not-skip-undoing-activation",
        Facts(S.ACTIVATING, "1.1.0", clean_stop=True),
        Step.UNDO_ACTIVATION,
        S.ROLLED_BACK,
        attempts=1,
    ),
    Row(
        "activation-killed-third-time-refused",
        Facts(S.ACTIVATING, "1.1.0", attempts=2, crash_loop_limit=3),
        Step.UNDO_ACTIVATION,
        S.ROLLED_BACK,
        attempts=3,
        refused=True,
    ),
    Row(
        "silent-switch-ignored-mid-activation",
        Facts(S.ACTIVATING, "1.1.0", silent_switch=True),
        Step.UNDO_ACTIVATION,
        S.ROLLED_BACK,
        attempts=1,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_recovery_plan(row: Row) -> None:
    plan = plan_recovery(row.facts)
    assert (plan.step, plan.next_state, plan.attempts, plan.refuse is not None) == (
        row.step,
        row.next_state,
        row.attempts,
        row.refused,
    ), plan
    if plan.next_state is not None:
        assert plan.reason, "every row written says why"


def test_every_journal_state_has_a_row() -> None:
    covered = {r.facts.state for r in ROWS}
    assert covered == {None, *OTAState}


def test_probation_restart_counts_up() -> None:
    plan = plan_recovery(Facts(S.PROBATION, "1.1.0", restarts=1, crash_loop_limit=5))
    assert plan == Plan(
        Step.PROBATION_RESTART, S.PROBATION, "restart 2 during probation", restarts=2
    )
