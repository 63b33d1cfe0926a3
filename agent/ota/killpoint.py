"""Named crash points: EDGE_AGENT_KILL_AT=<point>#<n> makes the process SIGKILL itself."""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT_ENV = "EDGE_AGENT_KILL_AT"
KILL_TRACE_ENV = "EDGE_AGENT_KILL_TRACE"
# the signal a kill point dies of (a name such as SIGSEGV; SIGKILL when unset), so a test
# can make a model "crash the runtime" the way a native fault would
KILL_SIGNAL_ENV = "EDGE_AGENT_KILL_SIGNAL"

_hits: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """Die here with SIGKILL when the environment names this point (and hit count).

    ``EDGE_AGENT_KILL_AT=journal.saved:GATING#1`` kills at the first time the point is
    reached; without ``#n`` the first hit is meant. ``EDGE_AGENT_KILL_TRACE=<file>``
    appends every point reached, so a test can enumerate the points of a real run.
    Costs one dict lookup when neither variable is set.
    """
    want = os.environ.get(KILL_AT_ENV)
    trace = os.environ.get(KILL_TRACE_ENV)
    if not want and not trace:
        return
    _hits[name] += 1
    label = f"{name}#{_hits[name]}"
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(label + "\n")
    if want and (want == label or (want == name and _hits[name] == 1)):
        signum = getattr(signal, os.environ.get(KILL_SIGNAL_ENV) or "SIGKILL", signal.SIGKILL)
        if signum != signal.SIGKILL:
            # a handler (faulthandler, Python's SIGINT) must not turn the fault into
            # anything but death by that signal
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signal.SIGKILL)  # a signal that does not kill (SIGCHLD...)


def reset_kill_counts() -> None:
    """Forget hit counts (a forked test child starts counting from zero)."""
    _hits.clear()
