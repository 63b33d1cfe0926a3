"""What the agent does on start about the journal's last row: a pure function of the facts.

``plan_recovery`` decides (its next states are FLOW's, agent/ota/states.py);
``OTAService.recover`` (agent/ota/startup.py) gathers the facts
from the journal and the links and carries the plan out. Keeping the decision free of I/O
lets tests/ota/test_recovery_plan.py check it row by row for every state, and the
kill-point tests check that carrying it out survives a kill at each step.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from agent.ota.probation import crash_loop_tripped
from agent.ota.states import AT_REST, RECOVERY, OTAEvent, OTAState, Recovery, next_state


class Step(str, enum.Enum):
    """One way ``recover`` ends; the value is what it reports."""

    NOTHING = "nothing in flight"
    # the links show a rollback whose ROLLED_BACK row never landed: journal it now
    RECORD_ROLLBACK = "rollback recorded"
    # a CLI command found probation running: it is not a restart of the agent
    PROBATION_RUNNING = "probation in progress"
    PROBATION_RESTART = "probation continues"
    CRASH_LOOP_ROLLBACK = "rolled back (crash loop)"
    CLEAN_STOP_RETRY = "abandoned (clean stop)"
    UNDO_ACTIVATION = "activation undone"
    REFUSE = "refused after repeated interruptions"
    RETRY = "abandoned"


# The event each step fires (the next state is FLOW's, agent/ota/states.py).
STEP_EVENT: Mapping[Step, OTAEvent] = MappingProxyType(
    {
        Step.RECORD_ROLLBACK: OTAEvent.ROLLBACK_FOUND,
        Step.PROBATION_RESTART: OTAEvent.RESTARTED,
        Step.CRASH_LOOP_ROLLBACK: OTAEvent.CRASH_LOOP,
        Step.CLEAN_STOP_RETRY: OTAEvent.INTERRUPTED,
        Step.UNDO_ACTIVATION: OTAEvent.ACTIVATION_UNDONE,
        Step.REFUSE: OTAEvent.INTERRUPTED_TOO_OFTEN,
        Step.RETRY: OTAEvent.INTERRUPTED,
    }
)


@dataclass(frozen=True)
class Facts:
    """What recovery looks at, read by the caller before anything is changed."""

    state: OTAState | None  # the journal's last state; None for an empty journal
    version: str = ""  # the version that row is about ("" when none)
    restarts: int = 0  # the last row's count of agent restarts during probation
    attempts: int = 0  # earlier interruptions of this version (the journal's attempts: value)
    clean_stop: bool = False  # the agent's clean-stop mark names the last row
    silent_switch: bool = False  # links show an unjournaled rollback (rest/probation only)
    agent_start: bool = True  # False for a CLI command (not a restart)
    crash_loop_limit: int = 3


@dataclass(frozen=True)
class Plan:
    """What to do: the step, the row to write (if any) and its reason."""

    step: Step
    next_state: OTAState | None = None
    reason: str = ""
    # the version's interruption count to store before acting (None: leave it)
    attempts: int | None = None
    restarts: int | None = None  # PROBATION_RESTART's new restart count
    refuse: str | None = None  # also record a refusal of this version, with this reason


def _to(f: Facts, step: Step) -> OTAState:
    assert f.state is not None  # only in-flight states get here
    return next_state(f.state, STEP_EVENT[step])


def plan_recovery(f: Facts) -> Plan:
    """The recovery for ``f``; every branch is a row in tests/ota/test_recovery_plan.py."""
    if f.state is None or f.state in AT_REST:
        return Plan(Step.RECORD_ROLLBACK) if f.silent_switch else Plan(Step.NOTHING)
    action = RECOVERY[f.state]
    if action is Recovery.CONTINUE_PROBATION:
        if f.silent_switch:
            return Plan(Step.RECORD_ROLLBACK)
        if not f.agent_start:
            return Plan(Step.PROBATION_RUNNING)
        restarts = f.restarts + 1
        if crash_loop_tripped(restarts, f.crash_loop_limit):
            reason = f"crash loop: {restarts} restarts during probation"
            return Plan(Step.CRASH_LOOP_ROLLBACK, _to(f, Step.CRASH_LOOP_ROLLBACK), reason)
        reason = f"restart {restarts} during probation"
        return Plan(
            Step.PROBATION_RESTART, _to(f, Step.PROBATION_RESTART), reason, restarts=restarts
        )
    if action is Recovery.ABANDON and f.clean_stop:
        # the agent stopped cleanly mid-step (SIGTERM): not a crash, not counted
        reason = f"stopped cleanly in {f.state.value}; will retry"
        return Plan(Step.CLEAN_STOP_RETRY, _to(f, Step.CLEAN_STOP_RETRY), reason)
    attempts = f.attempts + 1
    if action is Recovery.UNDO_ACTIVATION:
        reason = f"interrupted during activation (attempt {attempts}); links restored"
        refuse = (
            f"activation interrupted {attempts} times" if attempts >= f.crash_loop_limit else None
        )
        return Plan(
            Step.UNDO_ACTIVATION, _to(f, Step.UNDO_ACTIVATION), reason, attempts, refuse=refuse
        )
    if attempts >= f.crash_loop_limit and f.version:
        reason = f"interrupted {attempts} times in {f.state.value}; refused"
        return Plan(Step.REFUSE, _to(f, Step.REFUSE), reason, attempts, refuse=reason)
    reason = f"interrupted in {f.state.value} (attempt {attempts}); will retry"
    return Plan(Step.RETRY, _to(f, Step.RETRY), reason, attempts)
