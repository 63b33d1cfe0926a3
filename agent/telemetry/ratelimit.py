"""Rate-limited warnings: the first of a kind is logged, then one summary per interval."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Seen:
    last_logged_s: float
    suppressed: int = 0


class WarnEvery:
    """Logs a warning per key at most once per ``interval_s``.

    A failing camera or a full disk can repeat the same warning at the frame rate for
    hours; the journal then holds nothing else. The first warning of a key is logged as
    is; later ones within the interval are counted, and the next one after it is logged
    with "(N more in the last M s)" appended.
    """

    def __init__(self, clock_s: Callable[[], float] = time.monotonic) -> None:
        self._clock_s = clock_s
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()

    def warn(
        self,
        logger: logging.Logger,
        key: str,
        interval_s: float,
        msg: str,
        *args: object,
        level: int = logging.WARNING,
    ) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval_s`` ago.

        Returns True when the message was logged.
        """
        now_s = self._clock_s()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now_s - seen.last_logged_s < interval_s:
                seen.suppressed += 1
                return False
            suppressed = 0 if seen is None else seen.suppressed
            since_s = 0.0 if seen is None else now_s - seen.last_logged_s
            self._seen[key] = _Seen(now_s)
        if suppressed:
            logger.log(level, msg + " (%d more in the last %.0f s)", *args, suppressed, since_s)
        else:
            logger.log(level, msg, *args)
        return True

    def suppressed(self, key: str) -> int:
        """How many warnings of ``key`` were held back since it was last logged."""
        with self._lock:
            seen = self._seen.get(key)
            return 0 if seen is None else seen.suppressed


_DEFAULT = WarnEvery()


def warn_every(
    logger: logging.Logger, key: str, interval_s: float, msg: str, *args: object
) -> bool:
    """Log a warning at most once per ``interval_s`` for ``key`` (process-wide)."""
    return _DEFAULT.warn(logger, key, interval_s, msg, *args)
