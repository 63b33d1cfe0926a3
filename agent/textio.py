"""Small shared I/O for the CLI: safe .npy reading, atomic writes, tables, progress lines."""

from __future__ import annotations

import fcntl
import io
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, overload

from agent.errors import EdgeAgentError, InputDataError, UsageError

if TYPE_CHECKING:
    import numpy.typing as npt


def load_npy(path: Path, max_bytes: int = 1 << 31) -> npt.NDArray[Any]:
    """Load an .npy file without pickles; one-line errors for missing or broken files."""
    # numpy is imported where it is used: config loading and key files use this module's
    # file helpers, and `edge-agent status` must not pay numpy's import for them.
    import numpy as np

    with open_regular(path, ".npy file", InputDataError) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise InputDataError(f"{path}: {size} bytes is more than the {max_bytes} allowed")
        try:
            arr = np.load(fh, allow_pickle=False)
        except ValueError as exc:
            raise InputDataError(f"{path}: not a plain .npy array ({exc})") from None
        except (OSError, EOFError) as exc:
            raise InputDataError(f"{path}: cannot read .npy ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise InputDataError(f"{path}: expected one .npy array, not an .npz archive")
    return arr


# What each kind of non-regular path is called in errors (the first test that fits).
_SPECIAL_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def file_kind(mode: int) -> str:
    """'regular file', 'directory', 'FIFO', ... for an st_mode."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "special file")


def check_regular_file(
    path: Path, what: str = "file", error: type[EdgeAgentError] = UsageError
) -> os.stat_result:
    """Refuse a path that is missing or not a regular file (after symlinks), unopened.

    Opening a FIFO waits for a writer forever and opening a device can act on it, so every
    file the agent is handed (packages, models, golden sets, keys, YAML) is checked here
    first: one ``error`` naming the path and what it is instead.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot open {what} ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {what} is a {file_kind(st.st_mode)}, not a regular file")
    return st


@overload
def open_regular(
    path: Path,
    what: str = ...,
    error: type[EdgeAgentError] = ...,
    buffering: Literal[-1] = ...,
) -> io.BufferedReader: ...


@overload
def open_regular(
    path: Path, what: str, error: type[EdgeAgentError], buffering: Literal[0]
) -> io.FileIO: ...


def open_regular(
    path: Path, what: str = "file", error: type[EdgeAgentError] = UsageError, buffering: int = -1
) -> io.BufferedReader | io.FileIO:
    """Open a regular file for reading; anything else is refused before it is opened.

    The path is checked, then opened with O_NONBLOCK (a path swapped for a FIFO in between
    does not block the open) and checked again on the open descriptor, which is what is
    read; O_NONBLOCK is cleared before it is returned.
    """
    check_regular_file(path, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot open {what} ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: {what} is a {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        raw = io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    return raw if buffering == 0 else io.BufferedReader(raw)


def read_regular(
    path: Path, max_bytes: int, what: str = "file", error: type[EdgeAgentError] = UsageError
) -> bytes:
    """The bytes of a small regular file (open_regular), refused when over ``max_bytes``."""
    with open_regular(path, what, error) as fh:
        try:
            data = fh.read(max_bytes + 1)
            size = os.fstat(fh.fileno()).st_size
        except OSError as exc:
            raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: {what} is {size} bytes, more than the {max_bytes} allowed")
    return data


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed): one writer at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a symlink planted at the lock's name is refused, not followed (O_CREAT
    # through a dangling link would create its target, wherever it points).
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_symlink(
    link: Path,
    target: str | os.PathLike[str] | None,
    sync_dir: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Point ``link`` at ``target`` atomically; ``target`` None removes the link.

    A temp link is made beside ``link`` and renamed over it, so a reader sees the old
    target or the new, never no link (a link, dangling link or regular file in the way is
    replaced; a directory is not). ``sync_dir`` fsyncs the link's folder afterwards (off
    for links that are remade at every start). ``on_step("tmp")`` runs once the temp link
    exists and ``on_step("replaced")`` after the rename: kill-point tests stop there.
    """
    if target is None:
        link.unlink(missing_ok=True)
    else:
        # per pid: two processes never share a temp name; a leftover of a killed one with
        # our pid is removed first (os.symlink does not overwrite)
        tmp = link.with_name(f".{link.name}.link{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        if on_step is not None:
            on_step("tmp")
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if on_step is not None:
            on_step("replaced")
    if sync_dir:
        fsync_dir(link.parent)


PRIVATE_MODE = 0o600


@contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A new file beside ``path`` that replaces it only when the block ends without error.

    The temp file comes from mkstemp in the target directory (O_CREAT|O_EXCL|O_NOFOLLOW,
    an unpredictable name, mode 0600), so a planted file or symlink is never opened or
    written through, and a private file is never readable by others, not even for an
    instant. A wider ``mode`` (exact, not masked by the umask) is set before the first
    byte is written. The file and then the directory are fsynced, so a crash leaves the
    old content or the new, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The leading dot keeps directory watchers (pipeline sources) off partial files.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode != PRIVATE_MODE:
                os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half.

    Pass ``mode=PRIVATE_MODE`` (0600) for keys, tokens and anything secret: see atomic_file.
    """
    with atomic_file(path, mode) as fh:
        fh.write(data)


def save_npy(path: Path, arr: npt.NDArray[Any]) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    try:
        write_atomic(path, buf.getvalue())
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({exc.strerror})") from None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress_printer(label: str, width: int = 30) -> Callable[[float], None]:
    """A progress bar on stderr for long work (only used when stderr is a terminal)."""

    def show(fraction: float) -> None:
        filled = int(width * max(0.0, min(1.0, fraction)))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
