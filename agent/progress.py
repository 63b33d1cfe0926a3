"""Progress of long work on stderr: a redrawn bar on a terminal, one line per 10 % otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

# Byte counts below this finish in well under a second: no output for them (a 10 kB
# package would otherwise print ten lines into a log).
MIN_BYTES = 8 << 20
REDRAW_S = 0.2

# Off unless the CLI turns it on (agent.cli.main, not for `run` and not with -q): library
# callers, the daemon and tests get no output from here.
_enabled = False


def configure(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def is_enabled() -> bool:
    return _enabled


def _size(n: float) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts done units of a known total; prints only when the CLI enabled it.

    unit "bytes" shows sizes and a rate in MB/s; any other unit is shown as a count
    (`rows`, `%`). On a terminal the line is redrawn at most every REDRAW_S and ended
    with a newline by close(), so whatever prints next starts on its own line.
    """

    def __init__(
        self,
        label: str,
        total: float,
        *,
        unit: str = "bytes",
        done: float = 0,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        min_total: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit, self.done = label, float(total), unit, float(done)
        self.stream = stream if stream is not None else sys.stderr
        threshold = (MIN_BYTES if unit == "bytes" else 0) if min_total is None else min_total
        on = _enabled if enabled is None else enabled
        self.active = on and self.total > 0 and self.total >= threshold
        self.tty = self.active and _isatty(self.stream)
        self.clock = clock
        self.started = clock()
        self._start_done = self.done
        self._last_draw = float("-inf")
        self._next_tenth = int(self.done / self.total * 10) + 1 if self.total > 0 else 11
        self._drawn = False
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def advance(self, n: float) -> None:
        self.set(self.done + n)

    def set(self, done: float) -> None:
        self.done = min(float(done), self.total) if self.total > 0 else float(done)
        if not self.active or self._closed:
            return
        if self.tty:
            now = self.clock()
            if now - self._last_draw >= REDRAW_S or self.done >= self.total:
                self._last_draw = now
                self._write("\r" + self.line() + "\x1b[K")
                self._drawn = True
            return
        while self._next_tenth <= 10 and self.done >= self.total * self._next_tenth / 10:
            self._write(self.line(percent=self._next_tenth * 10) + "\n")
            self._next_tenth += 1

    def fraction(self, value: float) -> None:
        """For callers that report a fraction 0..1 (the gate, bench-model)."""
        self.set(value * self.total)

    def line(self, percent: int | None = None) -> str:
        pct = percent if percent is not None else int(self.done / self.total * 100)
        elapsed = max(1e-9, self.clock() - self.started)
        rate = (self.done - self._start_done) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else None
        if self.unit == "bytes":
            amount = f"{_size(self.done)} of {_size(self.total)}, {_size(rate)}/s"
        elif self.unit == "%":
            amount = ""
        else:
            amount = f"{self.done:.0f} of {self.total:.0f} {self.unit}, {rate:.0f}/s"
        eta = "" if left is None or self.done >= self.total else f"ETA {_eta(left)}"
        parts = ", ".join(p for p in (amount, eta) if p)
        inner = f" ({parts})" if parts else ""
        return f"{self.label}: {pct:3d}%{inner}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tty and self._drawn:
            self._write("\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop the work
            self.active = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressReader:
    """A binary file wrapper that reports every read to a Progress (verify, publish)."""

    def __init__(self, fh: Any, progress: Progress) -> None:
        self.fh, self.progress = fh, progress

    def read(self, n: int = -1) -> bytes:
        data = bytes(self.fh.read(n))
        self.progress.advance(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        n = int(self.fh.readinto(buffer))
        self.progress.advance(n)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)
