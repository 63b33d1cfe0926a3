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

    Except when the backward jump undoes a forward one: a clock set years ahead (a dead
    RTC battery, a GPS week rollover, a typo) that NTP then sets right jumps back to the
    time line it left. The stamps follow it at once: carrying the wrong time forward as a
    high-water mark would stamp every later row in the future for years. The same holds
    across a restart: the last stored time only marks where a correction may land, it is
    never a floor for stamps while the wall clock reads a plausible time.
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
        # the last time stored by an earlier run (raise_floor): only counted from while
        # the wall clock reads before the floor (not set yet)
        self._last_stored_ns = 0
        self._anchor_wall_ns: int | None = None
        self._anchor_mono_ns = 0
        # (wall, monotonic) of the time line before the last forward jump: a backward
        # jump that lands on or after it is a correction, not a clock going wrong
        self._before_jump: tuple[int, int] | None = None
        self._last_stamp_ns = 0
        self._trusted = True
        # no plausible wall reading yet: the first one (NTP sync) is trusted at once
        self._unset = False
        self.jumps: list[ClockJump] = []

    def raise_floor(self, last_good_unix_ns: int) -> None:
        """The last time this store used (kept across restarts).

        While the wall clock reads before the floor (an RTC-less board before NTP), rows
        are stamped from this time on rather than from the floor. It is not a floor for a
        plausible wall clock: that time may itself have come from a clock running ahead.
        """
        self._last_stored_ns = max(self._last_stored_ns, last_good_unix_ns)

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
            return self._first(wall, mono)
        expected = self._anchor_wall_ns + (mono - self._anchor_mono_ns)
        delta = wall - expected
        if self._unset and wall >= self._floor_unix_ns:
            # the clock got set (NTP): trusted even when behind the time counted from
            if abs(delta) > self._tolerance_ns:
                self.jumps.append(ClockJump(delta, wall, expected))
            self._unset = False
            self._anchor(wall, mono)
            return self._stamp(wall, wall, True)
        if abs(delta) > self._tolerance_ns and (self._trusted or delta > 0):
            self.jumps.append(ClockJump(delta, wall, expected))
        if wall >= self._floor_unix_ns:
            if delta > self._tolerance_ns and self._trusted:
                # a forward jump from a good time line: remember it, a correction may come
                self._before_jump = (expected, mono)
            if delta >= -self._tolerance_ns:
                # in step, or jumped forward to a plausible time: trust the wall clock
                self._anchor(wall, mono)
                return self._stamp(wall, wall, True)
            if self._corrects_jump(wall, mono):
                # back onto the time line a forward jump left: NTP undoing a wrong clock
                self._before_jump = None
                self._anchor(wall, mono)
                return self._stamp(wall, wall, True)
        self._trusted = False
        return self._stamp(expected, wall, False)

    def _first(self, wall: int, mono: int) -> Stamp:
        if wall >= self._floor_unix_ns:
            if wall < self._last_stored_ns - self._tolerance_ns:
                # behind the last stored time: reported, but the stored time may be the
                # one that was wrong (a clock that ran ahead last run), so the wall wins
                self.jumps.append(
                    ClockJump(wall - self._last_stored_ns, wall, self._last_stored_ns)
                )
            elif self._last_stored_ns:
                # the device was off (or its clock ran ahead) since the last stored
                # time: a later step back to it or after it is a correction
                self._before_jump = (self._last_stored_ns, mono)
            self._anchor(wall, mono)
            return self._stamp(wall, wall, True)
        # No good time yet: count from the floor (or the last stored time) so order is
        # kept; flag it.
        start = max(self._floor_unix_ns, self._last_stored_ns)
        self._anchor_wall_ns, self._anchor_mono_ns = start, mono
        self._trusted = False
        self._unset = True
        return self._stamp(start, wall, False)

    def _corrects_jump(self, wall: int, mono: int) -> bool:
        if self._before_jump is None:
            return False
        line_wall, line_mono = self._before_jump
        return wall >= line_wall + (mono - line_mono) - self._tolerance_ns

    def _anchor(self, wall: int, mono: int) -> None:
        if self._anchor_wall_ns is not None and not self._trusted:
            # an untrusted stretch (unset clock, counted time) is not a time line to
            # come back to
            self._before_jump = None
        self._anchor_wall_ns, self._anchor_mono_ns = wall, mono
        self._trusted = True

    def _stamp(self, assigned: int, wall: int, ok: bool) -> Stamp:
        # Stamps never go backwards across a re-anchor within the tolerance; a larger
        # step back is a correction the stamps must follow (rows keep their order by seq).
        if self._last_stamp_ns - self._tolerance_ns <= assigned < self._last_stamp_ns:
            assigned = self._last_stamp_ns
        self._last_stamp_ns = assigned
        return Stamp(assigned, wall, ok)
