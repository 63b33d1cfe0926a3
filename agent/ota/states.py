"""The OTA state machine as data: states, the transition table, and what a restart does in each."""

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

# Every allowed move, in one place. IDLE as a target from an in-flight state means
# "nothing changed on disk, try again later" (network down, interrupted check).
TRANSITIONS: Mapping[OTAState, frozenset[OTAState]] = MappingProxyType(
    {
        S.IDLE: frozenset({S.CHECKING, S.VERIFYING, S.ROLLED_BACK}),
        S.CHECKING: frozenset({S.IDLE, S.DOWNLOADING, S.VERIFYING, S.REJECTED}),
        S.DOWNLOADING: frozenset({S.IDLE, S.VERIFYING, S.REJECTED}),
        S.VERIFYING: frozenset({S.IDLE, S.GATING, S.REJECTED}),
        # ROLLED_BACK: an operator's rollback while a candidate is in the gate (the gate
        # runs without the OTA lock); the install drops the candidate after the gate
        S.GATING: frozenset({S.IDLE, S.ACTIVATING, S.REJECTED, S.ROLLED_BACK}),
        S.ACTIVATING: frozenset({S.PROBATION, S.ROLLED_BACK}),
        S.PROBATION: frozenset({S.PROBATION, S.COMMITTED, S.ROLLED_BACK}),
        S.COMMITTED: frozenset({S.IDLE, S.CHECKING, S.VERIFYING, S.ROLLED_BACK}),
        S.REJECTED: frozenset({S.IDLE, S.CHECKING, S.VERIFYING, S.ROLLED_BACK}),
        S.ROLLED_BACK: frozenset({S.IDLE, S.CHECKING, S.VERIFYING, S.ROLLED_BACK}),
    }
)

# States with no work in flight: a restart has nothing to finish or undo.
AT_REST: frozenset[OTAState] = frozenset({S.IDLE, S.COMMITTED, S.REJECTED, S.ROLLED_BACK})


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
