"""One writer per state dir: an flock on state_dir/.lock, held by the daemon for its life."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
import weakref
from pathlib import Path
from typing import Any

from agent.errors import StateError

LOCK_NAME = ".lock"


class StateDirLockedError(StateError):
    """Another process (a daemon or a CLI command) holds the state dir's lock."""

    def __init__(self, message: str, holder_pid: int | None, holder_role: str = "") -> None:
        super().__init__(message)
        self.holder_pid = holder_pid
        self.holder_role = holder_role


class StateDirLock:
    """An exclusive ``fcntl.flock`` on ``state_dir/.lock``.

    flock (not a pid file) because the kernel drops it when its holder dies, SIGKILL
    included, so a killed daemon never leaves the state dir locked. The holder's pid is
    written into the file (with its role, ``daemon`` or ``command``) only to name it in
    error messages and to know whether waiting can help.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None
        self._finalizer: Any = None  # weakref.finalize closing the fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(
        self, timeout_s: float = 0.0, role: str = "command", poll_s: float = 0.1
    ) -> StateDirLock:
        """Take the lock, waiting up to ``timeout_s`` (0: fail at once when it is held).

        A daemon holds it for its whole life, so a daemon holder fails at once.
        """
        if self._fd is not None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(
                f"{self.path}: cannot open the state dir lock ({exc.strerror})"
            ) from None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise StateError(
                        f"{self.path}: cannot lock the state dir ({exc.strerror})"
                    ) from None
            pid, holder_role = _read_holder(fd)
            if holder_role == "daemon" or time.monotonic() >= deadline:
                os.close(fd)
                who = f"{holder_role or 'process'} {pid}" if pid else "another process"
                if holder_role == "daemon":
                    who = f"another daemon (pid {pid})"
                raise StateDirLockedError(
                    f"{self.path.parent}: the state dir is in use by {who} (it holds {self.path})",
                    pid,
                    holder_role,
                )
            time.sleep(poll_s)
        # best effort: the pid only names the holder in messages; the lock is the flock
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
        self._fd = fd
        # a holder dropped without release() (a test's daemon never shut down) still
        # closes the descriptor, and so the lock, when it is collected
        self._finalizer = weakref.finalize(self, os.close, fd)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        finalizer, self._finalizer = self._finalizer, None
        if fd is not None and finalizer is not None:
            # closing the descriptor drops the flock; the file stays (removing it would race
            # with a process that opened it and is about to lock it)
            finalizer()

    def __enter__(self) -> StateDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(state_dir: Path) -> int | None:
    """The pid written in a held lock, or None when nobody holds it (never raises)."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(fd)[0] or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> tuple[int | None, str]:
    """The pid and role the holder wrote (None, "" when unreadable)."""
    try:
        words = os.pread(fd, 64, 0).decode("ascii", "replace").split()
    except OSError:
        return None, ""
    pid = int(words[0]) if words and words[0].isdigit() else None
    return pid, words[1] if len(words) > 1 else ""
