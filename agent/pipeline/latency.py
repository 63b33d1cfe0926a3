"""The live latency window: the frame loop adds one sample per batch, readers get percentiles."""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Sequence


def sorted_percentile(ordered: Sequence[float], q: float) -> float:
    """numpy's default (linear) percentile of an already sorted, non-empty sequence."""
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


class LatencyWindow:
    """The last ``size`` latencies, kept sorted as they arrive.

    The frame loop's only cost is ``add`` (a bounded deque append, safe from any thread).
    A reader moves the samples that came since it last looked into a sorted list with
    bisect, so a status tick at a low FPS cap costs a few microseconds; sorting the whole
    window every tick cost ~200 us on the cold caches a mostly idle agent runs on. When
    more than an eighth of the window is new (a high FPS, or nobody read for a while) the
    sorted list is rebuilt instead, and the running sum is re-added exactly every
    ``size`` samples so it cannot drift over months.
    """

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        # Samples not yet seen by a reader. Bounded like the window: if nobody reads for a
        # while, the newest `size` are kept, which is all the window would hold anyway.
        self._inbox: deque[float] = deque(maxlen=size)
        self.add = self._inbox.append
        self._window: deque[float] = deque(maxlen=size)
        self._sorted: list[float] = []
        self._sum = 0.0
        self._since_rebuild = 0
        self._lock = threading.Lock()
        self._summary: dict[str, float | None] | None = None

    def summary_ms(self) -> dict[str, float | None]:
        """p50/p95/p99/mean of the window in milliseconds (None while it is empty)."""
        with self._lock:
            self._take_new()
            if self._summary is None:
                self._summary = self._summarize()
            return dict(self._summary)

    def last_ms(self, n: int) -> list[float]:
        """The newest ``n`` samples (at most the window) in milliseconds, oldest first."""
        with self._lock:
            self._take_new()
            if n <= 0:
                return []
            window = self._window
            return [v * 1000.0 for v in list(window)[-n:]]

    def __len__(self) -> int:
        with self._lock:
            self._take_new()
            return len(self._window)

    def _take_new(self) -> None:
        """Move the samples added since the last read into the window (holds the lock)."""
        new: list[float] = []
        inbox = self._inbox
        while True:
            try:
                new.append(inbox.popleft())
            except IndexError:
                break
        if not new:
            return
        self._summary = None
        self._since_rebuild += len(new)
        if len(new) > self.size // 8 or self._since_rebuild >= self.size:
            self._window.extend(new)
            self._sorted = sorted(self._window)
            self._sum = math.fsum(self._window)
            self._since_rebuild = 0
            return
        window, ordered = self._window, self._sorted
        for value in new:
            if len(window) == self.size:
                old = window.popleft()
                del ordered[bisect.bisect_left(ordered, old)]
                self._sum -= old
            window.append(value)
            bisect.insort(ordered, value)
            self._sum += value

    def _summarize(self) -> dict[str, float | None]:
        ordered = self._sorted
        if not ordered:
            return {"p50": None, "p95": None, "p99": None, "mean": None}
        p50, p95, p99 = (sorted_percentile(ordered, q) * 1000.0 for q in (50.0, 95.0, 99.0))
        return {
            "p50": round(p50, 3),
            "p95": round(p95, 3),
            "p99": round(p99, 3),
            "mean": round(self._sum / len(ordered) * 1000.0, 3),
        }
