"""The live latency window: the frame loop adds one sample per batch, readers get percentiles."""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence

PERCENTILES = (50.0, 95.0, 99.0)


def sorted_percentile(ordered: Sequence[float], q: float) -> float:
    """numpy's default ("linear") percentile, ``q`` in 0..100, of an already sorted sequence.

    The one percentile of the agent (live window, gate, probation, telemetry, benchmarks of
    a model): the same position, (n - 1) * q / 100, and the same two-sided interpolation as
    numpy's _lerp, so the value is np.percentile's to the last bit, in plain floats (~1 us a
    call where np.percentile costs ~100 us on a cold cache). No samples, or a q outside
    0..100, is a ValueError (np.percentile raises too).
    """
    n = len(ordered)
    if n == 0:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    position = (n - 1) * (q / 100.0)
    lo = int(position)
    hi = min(lo + 1, n - 1)
    frac = position - lo
    a, b = float(ordered[lo]), float(ordered[hi])
    # numpy interpolates from the nearer neighbour, which keeps a flat stretch (a == b) exact
    return b - (b - a) * (1.0 - frac) if frac >= 0.5 else a + (b - a) * frac


def percentile(values: Iterable[float], q: float) -> float:
    """sorted_percentile() of samples in any order."""
    return sorted_percentile(sorted(values), q)


def latency_summary_ms(samples_s: Iterable[float]) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds of latencies given in seconds (all 0.0 for none)."""
    ordered = sorted(float(s) * 1000.0 for s in samples_s)
    if not ordered:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
    p50, p95, p99 = (sorted_percentile(ordered, q) for q in PERCENTILES)
    return {
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "mean_ms": math.fsum(ordered) / len(ordered),
    }


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
        p50, p95, p99 = (sorted_percentile(ordered, q) * 1000.0 for q in PERCENTILES)
        return {
            "p50": round(p50, 3),
            "p95": round(p95, 3),
            "p99": round(p99, 3),
            "mean": round(self._sum / len(ordered) * 1000.0, 3),
        }
