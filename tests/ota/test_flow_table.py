"""The OTA flow table (agent/ota/states.py FLOW) row by row, and what the service does with it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest

from agent.errors import StateError
from agent.ota.recovery import STEP_EVENT, Facts, Step, plan_recovery
from agent.ota.states import (
    AT_REST,
    FLOW,
    RECOVERY,
    RECOVERY_TARGET,
    TRANSITIONS,
    OTAEvent,
    OTAState,
    check_transition,
    next_state,
)

from .conftest import Device

S, E = OTAState, OTAEvent
REST = (S.IDLE, S.COMMITTED, S.REJECTED, S.ROLLED_BACK)
BEFORE_ACTIVATION = (S.CHECKING, S.DOWNLOADING, S.VERIFYING, S.GATING)
IN_FLIGHT = [s for s in OTAState if s not in AT_REST]


@dataclass(frozen=True)
class Move:
    """In ``state`` the service reports ``event`` -> the journal moves to ``then``."""

    state: OTAState
    event: OTAEvent
    then: OTAState

    @property
    def id(self) -> str:
        return f"{self.state.value}-{self.event.value}"


# Written out by hand (not read from FLOW), so a changed FLOW row fails here.
MOVES = [
    *[Move(s, E.FOUND, S.CHECKING) for s in REST],
    *[Move(s, E.INSTALL_STARTED, S.VERIFYING) for s in (*REST, S.CHECKING)],
    *[Move(s, E.ROLLBACK, S.ROLLED_BACK) for s in (*REST, S.GATING, S.PROBATION)],
    *[Move(s, E.ROLLBACK_FOUND, S.ROLLED_BACK) for s in (*REST, S.PROBATION)],
    Move(S.CHECKING, E.DOWNLOAD_STARTED, S.DOWNLOADING),
    Move(S.DOWNLOADING, E.DOWNLOADED, S.VERIFYING),
    Move(S.DOWNLOADING, E.DOWNLOAD_FAILED, S.IDLE),
    Move(S.VERIFYING, E.VERIFIED, S.GATING),
    Move(S.VERIFYING, E.VERIFY_FAILED, S.REJECTED),
    Move(S.VERIFYING, E.VERIFY_ERROR, S.IDLE),
    Move(S.GATING, E.GATE_PASSED, S.ACTIVATING),
    Move(S.GATING, E.GATE_FAILED, S.REJECTED),
    Move(S.GATING, E.GATE_STOPPED, S.IDLE),
    *[Move(s, E.INTERRUPTED, S.IDLE) for s in BEFORE_ACTIVATION],
    *[Move(s, E.INTERRUPTED_TOO_OFTEN, S.REJECTED) for s in BEFORE_ACTIVATION],
    Move(S.ACTIVATING, E.ACTIVATED, S.PROBATION),
    Move(S.ACTIVATING, E.LOAD_FAILED, S.ROLLED_BACK),
    Move(S.ACTIVATING, E.ACTIVATION_UNDONE, S.ROLLED_BACK),
    Move(S.PROBATION, E.RESTARTED, S.PROBATION),
    Move(S.PROBATION, E.PROBATION_PASSED, S.COMMITTED),
    Move(S.PROBATION, E.PROBATION_FAILED, S.ROLLED_BACK),
    Move(S.PROBATION, E.CRASH_LOOP, S.ROLLED_BACK),
]


@dataclass(frozen=True)
class Refused:
    """A (state, event) pair the flow must refuse, and why that would be wrong."""

    id: str
    state: OTAState
    event: OTAEvent
    why: str


REFUSED = [
    Refused("commit-without-probation", S.IDLE, E.PROBATION_PASSED, "commit a model never run"),
    Refused("activate-ungated", S.VERIFYING, E.GATE_PASSED, "skip the gate"),
    Refused("activate-unverified", S.DOWNLOADING, E.VERIFIED, "gate an unverified file"),
    Refused("live-without-activation", S.GATING, E.ACTIVATED, "probation before the switch"),
    Refused("check-during-probation", S.PROBATION, E.FOUND, "two updates at once"),
    Refused("install-during-probation", S.PROBATION, E.INSTALL_STARTED, "two updates at once"),
    Refused("install-mid-download", S.DOWNLOADING, E.INSTALL_STARTED, "two files at once"),
    Refused("download-twice", S.DOWNLOADING, E.DOWNLOAD_STARTED, "a second download row"),
    Refused("download-from-rest", S.IDLE, E.DOWNLOAD_STARTED, "download nothing decided"),
    Refused("rollback-mid-activation", S.ACTIVATING, E.ROLLBACK, "links half switched"),
    Refused("rollback-mid-download", S.DOWNLOADING, E.ROLLBACK, "nothing to roll back yet"),
    Refused("abandon-activation", S.ACTIVATING, E.INTERRUPTED, "forget half-moved links"),
    Refused("abandon-probation", S.PROBATION, E.INTERRUPTED, "forget a live model"),
    Refused("restart-outside-probation", S.COMMITTED, E.RESTARTED, "count a restart at rest"),
    Refused("crash-loop-at-rest", S.COMMITTED, E.CRASH_LOOP, "roll back a committed model"),
    Refused("refuse-committed", S.COMMITTED, E.GATE_FAILED, "refuse what already runs"),
    Refused("rest-to-idle", S.COMMITTED, E.INTERRUPTED, "nothing in flight to abandon"),
]


@pytest.mark.parametrize("move", MOVES, ids=[m.id for m in MOVES])
def test_flow_row(move: Move) -> None:
    assert next_state(move.state, move.event) is move.then
    check_transition(move.state, move.then)  # the journal allows what the flow does


def test_flow_has_no_row_the_table_above_lacks() -> None:
    assert dict(FLOW) == {(m.state, m.event): m.then for m in MOVES}


@pytest.mark.parametrize("row", REFUSED, ids=[r.id for r in REFUSED])
def test_flow_refuses(row: Refused) -> None:
    with pytest.raises(StateError) as err:
        next_state(row.state, row.event)
    # the error names both, so a log line says what was tried where
    assert row.state.value in str(err.value) and row.event.value in str(err.value), row.why


def test_transitions_are_the_flows_moves() -> None:
    derived = {s: frozenset(t for (f, _e), t in FLOW.items() if f is s) for s in OTAState}
    assert dict(TRANSITIONS) == derived


def _reachable(start: OTAState) -> set[OTAState]:
    seen, todo = {start}, deque([start])
    while todo:
        here = todo.popleft()
        for (state, _event), target in FLOW.items():
            if state is here and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_state_is_reachable_from_idle() -> None:
    assert _reachable(S.IDLE) == set(OTAState)


@pytest.mark.parametrize("state", IN_FLIGHT, ids=[s.value for s in IN_FLIGHT])
def test_every_in_flight_state_has_a_way_back_to_rest(state: OTAState) -> None:
    assert _reachable(state) & AT_REST, f"{state.value} can never come to rest"


@pytest.mark.parametrize("state", IN_FLIGHT, ids=[s.value for s in IN_FLIGHT])
def test_each_restart_recovery_is_a_flow_move(state: OTAState) -> None:
    target = RECOVERY_TARGET[RECOVERY[state]]
    assert any(FLOW.get((state, e)) is target for e in STEP_EVENT.values()), state


@pytest.mark.parametrize("step", list(STEP_EVENT), ids=[s.name for s in STEP_EVENT])
def test_each_recovery_step_fires_an_event_some_in_flight_state_takes(step: Step) -> None:
    event = STEP_EVENT[step]
    assert any(e is event for (_s, e) in FLOW), step


def test_recovery_plans_follow_the_flow() -> None:
    # every plan that writes a row writes FLOW's state for its step's event
    for state in OTAState:
        for facts in (Facts(state, "1.1.0"), Facts(state, "1.1.0", attempts=9, restarts=9)):
            plan = plan_recovery(facts)
            if plan.next_state is not None:
                assert plan.next_state is next_state(state, STEP_EVENT[plan.step]), plan


def test_the_service_refuses_an_event_its_state_does_not_take(device: Device) -> None:
    """A real state.db: the refused move names state and event and writes no row."""
    svc = device.service()
    try:
        with pytest.raises(StateError) as err:
            svc.fire(E.PROBATION_PASSED, reason="no probation ran")
        assert "IDLE" in str(err.value) and "probation_passed" in str(err.value)
        assert svc.journal.last() is None
        with pytest.raises(StateError):
            svc.commit()  # commit() fires PROBATION_PASSED: refused outside probation
        assert svc.journal.last() is None
        entry = svc.fire(E.INSTALL_STARTED, package="digits", version="1.0.0")
        assert entry.state is S.VERIFYING
        with pytest.raises(StateError, match="VERIFYING"):
            svc.fire(E.ACTIVATED)
        assert svc.journal.state() is S.VERIFYING
        assert svc.fire(E.VERIFY_ERROR, reason="disk").state is S.IDLE
    finally:
        svc.close()
