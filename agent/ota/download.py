"""Resumable downloads into staging/: HTTP Range after a cut, length capped, sha256 checked."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.errors import FetchError, OTAError
from agent.ota.fetch import HttpFetcher, TransferCut
from agent.ota.killpoint import kill_point
from agent.progress import Progress
from agent.textio import fsync_dir

log = logging.getLogger(__name__)

# A download is fsynced every this many bytes so a resume after power loss loses little.
SYNC_EVERY_BYTES = 1 << 20


class TargetMismatchError(FetchError):
    """The bytes served are not the signed target (wrong hash, more than the signed length).

    A fetch failure, not a refusal: the network (a broken cache, a man in the middle) must
    not be able to make a device refuse a genuine release. The bad file is deleted, so the
    next try downloads from byte 0.
    """


@dataclass(frozen=True)
class TargetRef:
    """What TUF says about a file: where to get it, its exact length and sha256."""

    url: str
    length: int
    sha256: str
    filename: str


def check_free_space(directory: Path, need_bytes: int, reserve_bytes: int) -> None:
    """OTAError when ``directory``'s filesystem lacks ``need_bytes`` plus a reserve."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < need_bytes + reserve_bytes:
        raise OTAError(
            f"{directory}: not enough free space ({free} bytes free, need {need_bytes} "
            f"+ {reserve_bytes} reserve)"
        )


def download_target(
    http: HttpFetcher,
    target: TargetRef,
    staging_dir: Path,
    reserve_bytes: int = 0,
    attempts: int = 3,
) -> Path:
    """Fetch ``target`` into ``staging_dir`` and return the verified file's path.

    A ``<file>.part`` left by an earlier cut (this run or a previous process) is resumed
    with a Range request; a server that ignores Range restarts from zero. More bytes than
    the signed length, or a wrong sha256, deletes the partial file and raises
    TargetMismatchError; a transfer still short after ``attempts`` raises TransferCut.
    Both are FetchErrors: retry later.
    """
    final = staging_dir / target.filename
    part = staging_dir / (target.filename + ".part")
    if final.exists() and _sha256_of(final) == target.sha256:
        return final
    have = part.stat().st_size if part.exists() else 0
    if have > target.length:
        part.unlink()
        have = 0
    check_free_space(staging_dir, target.length - have, reserve_bytes)
    last_error: FetchError | None = None
    for attempt in range(1, attempts + 1):
        try:
            _fetch_into(http, target, part)
            break
        except TransferCut as exc:
            last_error = exc
            log.warning("download attempt %d/%d cut: %s", attempt, attempts, exc)
    else:
        assert last_error is not None
        raise last_error
    digest = _sha256_of(part)
    if digest != target.sha256:
        part.unlink(missing_ok=True)
        raise TargetMismatchError(
            f"{target.url}: sha256 {digest[:16]}... does not match the signed "
            f"{target.sha256[:16]}... (deleted; the next try starts from byte 0)"
        )
    os.replace(part, final)
    fsync_dir(staging_dir)
    kill_point("download.verified")
    return final


def _open_part(part: Path, append: bool) -> BinaryIO:
    """The partial download, opened without following a link planted in its place
    (staging/ holds unverified data; the agent never writes through a symlink there)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(part, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OTAError(f"{part}: is a symbolic link; refusing to write through it") from None
        raise
    return os.fdopen(fd, "ab" if append else "wb")


def _fetch_into(http: HttpFetcher, target: TargetRef, part: Path) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have == target.length:
        return
    status, chunks = http.open(target.url, start_byte=have)
    mode = "ab"
    if status == 200 and have:
        log.info("%s: server ignored Range; downloading from the start", target.url)
        mode, have = "wb", 0
    written_since_sync = 0
    label = f"download {target.url.rsplit('/', 1)[-1]}"
    with (
        _open_part(part, append=mode == "ab") as fh,
        Progress(label, target.length, done=have) as bar,
    ):
        try:
            for chunk in chunks:
                bar.advance(len(chunk))
                if have + len(chunk) > target.length:
                    fh.close()
                    part.unlink(missing_ok=True)
                    raise TargetMismatchError(
                        f"{target.url}: server sent more than the signed {target.length} "
                        "bytes (deleted; the next try starts from byte 0)"
                    )
                fh.write(chunk)
                have += len(chunk)
                written_since_sync += len(chunk)
                if written_since_sync >= SYNC_EVERY_BYTES:
                    fh.flush()
                    os.fsync(fh.fileno())
                    written_since_sync = 0
                    kill_point("download.synced")
        finally:
            if not fh.closed:
                fh.flush()
                os.fsync(fh.fileno())
    if have < target.length:
        raise TransferCut(f"{target.url}: connection closed at {have} of {target.length} bytes")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
