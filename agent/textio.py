"""Small shared I/O for the CLI: safe .npy reading, atomic writes, tables, progress lines."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import InputDataError, UsageError

if TYPE_CHECKING:  # numpy is imported by the two .npy helpers only: not every command needs it
    import numpy.typing as npt


def load_npy(path: Path, max_bytes: int = 1 << 31) -> npt.NDArray[Any]:
    """Load an .npy file without pickles; one-line errors for missing or broken files."""
    import numpy as np

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputDataError(f"{path}: file not found") from None
    if size > max_bytes:
        raise InputDataError(f"{path}: {size} bytes is more than the {max_bytes} allowed")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InputDataError(f"{path}: not a plain .npy array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputDataError(f"{path}: cannot read .npy ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise InputDataError(f"{path}: expected one .npy array, not an .npz archive")
    return arr


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed): one writer at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_npy(path: Path, arr: npt.NDArray[Any]) -> None:
    import io

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
