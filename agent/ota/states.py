"""The OTA state machine as data: states, events, the flow table, and what a restart does."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from agent.errors import StateError


class OTAState(str, enum.Enum):
    """One step of an update; the journal stores the value string."""

    IDLE = "IDLE"
    CHECKING = "CHECKING"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    GATING = "GATING"
    ACTIVATING = "ACTIVATING"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    REJECTED = "REJECTED"
    ROLLED_BACK = "ROLLED_BACK"


S = OTAState


class OTAEvent(str, enum.Enum):
    """What a step of the service reports; FLOW turns (state, event) into the next state."""

    FOUND = "found"  # a check decided to take the channel's release
    INSTALL_STARTED = "install_started"  # a package file at hand is to be verified
    DOWNLOAD_STARTED = "download_started"
    DOWNLOADED = "downloaded"
    DOWNLOAD_FAILED = "download_failed"  # a cut, a wrong hash, too many bytes: retried
    VERIFIED = "verified"  # signatures, files, compat and floor passed: on to the gate
    VERIFY_FAILED = "verify_failed"  # the package is refused
    VERIFY_ERROR = "verify_error"  # not the package's fault (cannot extract, disk): retried
    GATE_PASSED = "gate_passed"
    GATE_FAILED = "gate_failed"  # the gate refused the candidate, or could not run it
    GATE_STOPPED = "gate_stopped"  # the agent stops mid-gate: retried, not counted
    ACTIVATED = "activated"  # the new model is live: probation starts
    LOAD_FAILED = "load_failed"  # the new model did not load, warm or probe
    RESTARTED = "restarted"  # the agent restarted during probation (counted)
    PROBATION_PASSED = "probation_passed"
    PROBATION_FAILED = "probation_failed"
    CRASH_LOOP = "crash_loop"  # crash_loop_limit restarts during probation
    ROLLBACK = "rollback"  # an operator's or the channel's rollback to ``previous``
    ROLLBACK_FOUND = "rollback_found"  # the links show a rollback whose row never landed
    INTERRUPTED = "interrupted"  # a kill, clean stop or failed write ended the step
    INTERRUPTED_TOO_OFTEN = "interrupted_too_often"  # crash_loop_limit kills: refused
    ACTIVATION_UNDONE = "activation_undone"  # the links recorded before it were restored


E = OTAEvent

# States with no work in flight: a restart has nothing to finish or undo.
AT_REST: frozenset[OTAState] = frozenset({S.IDLE, S.COMMITTED, S.REJECTED, S.ROLLED_BACK})
# States an abandoned attempt leaves with nothing changed on disk.
_BEFORE_ACTIVATION = (S.CHECKING, S.DOWNLOADING, S.VERIFYING, S.GATING)
_REST_ORDER = (S.IDLE, S.COMMITTED, S.REJECTED, S.ROLLED_BACK)

# The whole flow as data: (state, event) -> next state. The service's steps report events
# and OTAService.fire looks the next state up here; a pair that is not here is refused.
# IDLE as a target from an in-flight state means "nothing changed on disk, try again later".
FLOW: Mapping[tuple[OTAState, OTAEvent], OTAState] = MappingProxyType(
    {
        **{(rest, E.FOUND): S.CHECKING for rest in _REST_ORDER},
        # a local install may also start while a check sits between CHECKING and its
        # download (the control socket's install takes the lock in that gap)
        **{(at, E.INSTALL_STARTED): S.VERIFYING for at in (*_REST_ORDER, S.CHECKING)},
        **{(rest, E.ROLLBACK): S.ROLLED_BACK for rest in _REST_ORDER},
        **{(rest, E.ROLLBACK_FOUND): S.ROLLED_BACK for rest in _REST_ORDER},
        (S.CHECKING, E.DOWNLOAD_STARTED): S.DOWNLOADING,
        (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
        (S.DOWNLOADING, E.DOWNLOAD_FAILED): S.IDLE,
        (S.VERIFYING, E.VERIFIED): S.GATING,
        (S.VERIFYING, E.VERIFY_FAILED): S.REJECTED,
        (S.VERIFYING, E.VERIFY_ERROR): S.IDLE,
        (S.GATING, E.GATE_PASSED): S.ACTIVATING,
        (S.GATING, E.GATE_FAILED): S.REJECTED,
        (S.GATING, E.GATE_STOPPED): S.IDLE,
        # an operator's rollback while a candidate is in the gate (the gate runs without
        # the OTA lock); the install drops the candidate after the gate
        (S.GATING, E.ROLLBACK): S.ROLLED_BACK,
        **{(at, E.INTERRUPTED): S.IDLE for at in _BEFORE_ACTIVATION},
        **{(at, E.INTERRUPTED_TOO_OFTEN): S.REJECTED for at in _BEFORE_ACTIVATION},
        (S.ACTIVATING, E.ACTIVATED): S.PROBATION,
        (S.ACTIVATING, E.LOAD_FAILED): S.ROLLED_BACK,
        (S.ACTIVATING, E.ACTIVATION_UNDONE): S.ROLLED_BACK,
        (S.PROBATION, E.RESTARTED): S.PROBATION,
        (S.PROBATION, E.PROBATION_PASSED): S.COMMITTED,
        (S.PROBATION, E.PROBATION_FAILED): S.ROLLED_BACK,
        (S.PROBATION, E.CRASH_LOOP): S.ROLLED_BACK,
        (S.PROBATION, E.ROLLBACK): S.ROLLED_BACK,
        (S.PROBATION, E.ROLLBACK_FOUND): S.ROLLED_BACK,
    }
)


def _moves(
    flow: Mapping[tuple[OTAState, OTAEvent], OTAState],
) -> dict[OTAState, frozenset[OTAState]]:
    moves: dict[OTAState, set[OTAState]] = {state: set() for state in OTAState}
    for (state, _event), target in flow.items():
        moves[state].add(target)
    return {state: frozenset(targets) for state, targets in moves.items()}


# Every allowed move (what the journal checks each row against), derived from FLOW.
TRANSITIONS: Mapping[OTAState, frozenset[OTAState]] = MappingProxyType(_moves(FLOW))


def next_state(current: OTAState, event: OTAEvent) -> OTAState:
    """The state FLOW moves ``current`` to on ``event``; StateError naming both when none."""
    target = FLOW.get((current, event))
    if target is None:
        known = ", ".join(sorted(e.value for (s, e) in FLOW if s is current))
        raise StateError(
            f"OTA flow: event {event.value} is not allowed in state {current.value} "
            f"(in {current.value}: {known})"
        )
    return target


class Recovery(str, enum.Enum):
    """What the agent does on start when the journal's last state is in flight."""

    NOTHING = "nothing"
    # No link moved yet: forget the attempt (partial downloads stay for Range resume).
    ABANDON = "abandon"
    # Links may be half switched: put back the links recorded before activation.
    UNDO_ACTIVATION = "undo_activation"
    # The new model is live: keep watching it; count the restart for the crash-loop breaker.
    CONTINUE_PROBATION = "continue_probation"


RECOVERY: Mapping[OTAState, Recovery] = MappingProxyType(
    {
        S.IDLE: Recovery.NOTHING,
        S.COMMITTED: Recovery.NOTHING,
        S.REJECTED: Recovery.NOTHING,
        S.ROLLED_BACK: Recovery.NOTHING,
        S.CHECKING: Recovery.ABANDON,
        S.DOWNLOADING: Recovery.ABANDON,
        S.VERIFYING: Recovery.ABANDON,
        S.GATING: Recovery.ABANDON,
        S.ACTIVATING: Recovery.UNDO_ACTIVATION,
        S.PROBATION: Recovery.CONTINUE_PROBATION,
    }
)

# The state each recovery ends in (must itself be an allowed transition).
RECOVERY_TARGET: Mapping[Recovery, OTAState] = MappingProxyType(
    {
        Recovery.ABANDON: S.IDLE,
        Recovery.UNDO_ACTIVATION: S.ROLLED_BACK,
        Recovery.CONTINUE_PROBATION: S.PROBATION,
    }
)


def check_transition(current: OTAState, target: OTAState) -> None:
    """Raise StateError when the table does not allow ``current -> target``."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current]))
        raise StateError(
            f"OTA journal: {current.value} -> {target.value} is not allowed "
            f"(from {current.value}: {allowed})"
        )


def parse_state(text: str) -> OTAState:
    """The state named by a journal row; StateError for an unknown name."""
    try:
        return OTAState(text)
    except ValueError:
        raise StateError(f"OTA journal: unknown state {text!r}") from None
