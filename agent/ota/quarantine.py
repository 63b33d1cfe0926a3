"""Corrupt state files found at start: moved aside and rebuilt, or reported for re-provisioning."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import EdgeAgentError, StateError

log = logging.getLogger(__name__)

STATE_DB = "state.db"
TUF_DIR = "tuf"
# Cached TUF metadata the client may drop and fetch again; root.json is the trust anchor
# put there by provisioning and is never replaced silently.
TUF_REFETCHABLE = ("timestamp.json", "snapshot.json", "targets.json")
MAX_SMALL_FILE_BYTES = 4 << 20


@dataclass(frozen=True)
class Quarantined:
    """One file moved aside: what it was, where it went and why."""

    path: Path
    moved_to: Path
    reason: str

    def to_attrs(self) -> dict[str, Any]:
        return {"file": str(self.path), "moved_to": str(self.moved_to), "reason": self.reason}


def quarantine_file(path: Path, reason: str, now_s: float | None = None) -> Path:
    """Rename ``path`` (and a SQLite file's -wal/-shm) to ``<name>.corrupt-<UTC time>``.

    The -wal/-shm keep SQLite's naming (``<new name>-wal``), so the kept copy still opens
    with its log for a post-mortem.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_s is None else now_s))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    try:
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{target}{suffix}"))
        _fsync_dir(path.parent)
    except OSError as exc:
        raise StateError(f"{path}: cannot move the corrupt file aside ({exc.strerror})") from None
    log.error("%s quarantined as %s: %s", path, target.name, reason)
    return target


def state_db_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable state.db (None: it opens and passes quick_check)."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        return f"SQLite cannot open it: {exc}"
    try:
        rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        # "file is not a database", "database disk image is malformed"
        return str(exc)
    finally:
        db.close()
    results = [str(r[0]) for r in rows]
    if results != ["ok"]:
        # one line for the log and the event: the first findings are enough to say why
        text = "; ".join(line for r in results for line in r.splitlines())
        return "quick_check: " + (text[:200] + "..." if len(text) > 200 else text)
    return None


def tuf_root_problem(state_dir: Path) -> str | None:
    """Why the trusted TUF root is unusable (None when it parses as signed root metadata)."""
    path = state_dir / TUF_DIR / "root.json"
    if not path.exists():
        return None
    return _metadata_problem(path, "root")


def check_tuf_root(state_dir: Path) -> None:
    """StateError asking to re-provision when the trusted root.json is corrupt."""
    problem = tuf_root_problem(state_dir)
    if problem is not None:
        path = state_dir / TUF_DIR / "root.json"
        raise StateError(
            f"{path}: the trusted TUF root is corrupt ({problem}); it is not replaced "
            "automatically: re-provision this device (edge-agent provision --tuf-root ...)"
        )


def _metadata_problem(path: Path, role: str) -> str | None:
    try:
        if path.stat().st_size > MAX_SMALL_FILE_BYTES:
            return f"larger than {MAX_SMALL_FILE_BYTES} bytes"
        data = json.loads(path.read_bytes())
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not JSON: {exc}"
    signed = data.get("signed") if isinstance(data, dict) else None
    if not isinstance(signed, dict) or not isinstance(data.get("signatures"), list):
        return "not signed TUF metadata"
    if signed.get("_type") != role:
        return f"holds {signed.get('_type')!r} metadata, not {role!r}"
    return None


def device_id_problem(state_dir: Path) -> str | None:
    """Why state_dir/device_id cannot be used as an id (None when absent or fine)."""
    path = state_dir / "device_id"
    try:
        if not path.exists():
            return None
        raw = path.read_bytes()[: MAX_SMALL_FILE_BYTES + 1]
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "not UTF-8 text"
    if not text or "\n" in text or len(text) > 128 or not text.isprintable():
        return "not one line of 1..128 printable characters"
    return None


@dataclass(frozen=True)
class StartCheck:
    """What the start-up check of the state dir found and did."""

    quarantined: tuple[Quarantined, ...] = ()
    rebuilt: str = ""
    problems: tuple[str, ...] = ()


def check_state_dir(
    state_dir: Path,
    rebuild: Callable[[Quarantined], str],
    event: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> StartCheck:
    """Check the files the agent reads at start; quarantine what is corrupt.

    ``rebuild`` makes a new state.db from the links after the old one was moved aside
    and returns what it did. A corrupt trusted root or device id is not replaced: it is
    reported (log, ``event``, ``problems``) so a person re-provisions; inference goes on.
    """
    moved: list[Quarantined] = []
    problems: list[str] = []
    rebuilt = ""

    def tell(name: str, attrs: Mapping[str, Any]) -> None:
        if event is not None:
            try:
                event(name, attrs)
            except Exception as exc:  # telemetry must never stop the start
                log.warning("telemetry event failed: %s", exc)

    db = state_dir / STATE_DB
    problem = state_db_problem(db)
    if problem is not None:
        item = Quarantined(db, quarantine_file(db, problem), problem)
        moved.append(item)
        tell("ota.quarantine", {**item.to_attrs(), "action": "rebuilt from the links"})
        rebuilt = rebuild(item)
        log.warning("state.db rebuilt: %s", rebuilt)
    for name in TUF_REFETCHABLE:
        path = state_dir / TUF_DIR / name
        if path.exists() and (problem := _metadata_problem(path, name[: -len(".json")])):
            item = Quarantined(path, quarantine_file(path, problem), problem)
            moved.append(item)
            tell("ota.quarantine", {**item.to_attrs(), "action": "fetched again"})
    try:
        check_tuf_root(state_dir)
    except EdgeAgentError as exc:
        problems.append(str(exc))
        log.error("%s", exc)
        tell("error", {"where": "ota.start", "error": str(exc)})
    id_problem = device_id_problem(state_dir)
    if id_problem is not None:
        message = (
            f"{state_dir / 'device_id'}: {id_problem}; the device id falls back to the "
            "config or the machine id: re-provision (edge-agent provision --device-id ...)"
        )
        problems.append(message)
        log.error("%s", message)
        tell("error", {"where": "ota.start", "error": message})
    return StartCheck(tuple(moved), rebuilt, tuple(problems))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
