"""Wall-clock timestamps checked against the monotonic clock, so jumps are seen, not trusted."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# 2024-01-01T00:00:00Z: a wall clock before this is a board without an RTC that has not
# synced yet (a Raspberry Pi boots in 1970 or at its last fake-hwclock save).
CLOCK_FLOOR_UNIX_NS = 1_704_067_200 * 1_000_000_000
JUMP_TOLERANCE_NS = 2_000_000_000


@dataclass(frozen=True)
class Stamp:
    """One timestamp: the time we assign, the raw wall reading, and whether they agree."""

    time_unix_ns: int
    observed_unix_ns: int
    clock_ok: bool


@dataclass(frozen=True)
class ClockJump:
    """A jump of the wall clock against the monotonic clock (negative = backwards)."""

    delta_ns: int
    wall_unix_ns: int
    expected_unix_ns: int


class CheckedClock:
    """Stamps rows with wall time while it moves with the monotonic clock.

    Forward jumps are accepted (an RTC-less board syncing NTP) but reported. A backward
    jump is reported and then ignored: stamps continue from the last good time plus
    monotonic time, flagged clock_ok=False, until the wall clock catches up again.
    """

    def __init__(
        self,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        floor_unix_ns: int = CLOCK_FLOOR_UNIX_NS,
        tolerance_ns: int = JUMP_TOLERANCE_NS,
    ) -> None:
        self._wall_ns = wall_ns
        self._monotonic_ns = monotonic_ns
        self._floor_unix_ns = floor_unix_ns
        self._tolerance_ns = tolerance_ns
        self._anchor_wall_ns: int | None = None
        self._anchor_mono_ns = 0
        self._last_stamp_ns = 0
        self._trusted = True
        self.jumps: list[ClockJump] = []

    def raise_floor(self, last_good_unix_ns: int) -> None:
        """Never stamp earlier than a time this store already used (kept across restarts)."""
        self._floor_unix_ns = max(self._floor_unix_ns, last_good_unix_ns)

    @property
    def last_stamp_ns(self) -> int:
        return self._last_stamp_ns

    def take_jumps(self) -> list[ClockJump]:
        """Jumps seen since the last call (the recorder turns each into an event)."""
        jumps, self.jumps = self.jumps, []
        return jumps

    def now(self) -> Stamp:
        return self.check(self._wall_ns(), self._monotonic_ns())

    def check(self, wall: int, mono: int) -> Stamp:
        """Stamp a (wall, monotonic) pair read earlier, e.g. by the thread that saw the event."""
        if self._anchor_wall_ns is None:
            if wall >= self._floor_unix_ns:
                self._anchor(wall, mono)
                return self._stamp(wall, wall, True)
            # No good time yet: count from the floor so order is kept; flag it.
            self._anchor_wall_ns, self._anchor_mono_ns = self._floor_unix_ns, mono
            self._trusted = False
            return self._stamp(self._floor_unix_ns, wall, False)
        expected = self._anchor_wall_ns + (mono - self._anchor_mono_ns)
        delta = wall - expected
        if abs(delta) > self._tolerance_ns and (self._trusted or delta > 0):
            self.jumps.append(ClockJump(delta, wall, expected))
        if delta >= -self._tolerance_ns and wall >= self._floor_unix_ns:
            # In step, or jumped forward to a plausible time: trust the wall clock.
            self._anchor(wall, mono)
            return self._stamp(wall, wall, True)
        self._trusted = False
        return self._stamp(expected, wall, False)

    def _anchor(self, wall: int, mono: int) -> None:
        self._anchor_wall_ns, self._anchor_mono_ns = wall, mono
        self._trusted = True

    def _stamp(self, assigned: int, wall: int, ok: bool) -> Stamp:
        # Stamps never go backwards, even across a re-anchor within the tolerance.
        assigned = max(assigned, self._last_stamp_ns)
        self._last_stamp_ns = assigned
        return Stamp(assigned, wall, ok)
