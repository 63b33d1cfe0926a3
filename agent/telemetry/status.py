"""Read-only telemetry status for `edge-agent status` and `telemetry status`; never raises."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any


def _file_bytes(db_path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += Path(f"{db_path}{suffix}").stat().st_size
    return total


def upload_summary(
    last_error: str | None, last_error_unix_ns: int | None, last_ok_unix_ns: int | None
) -> str | None:
    """One line on uploading: "ok", the last error when it is newer than the last success
    (e.g. "upload refused: 401 (...)"), or None before any attempt."""
    if last_error and (last_ok_unix_ns is None or (last_error_unix_ns or 0) > last_ok_unix_ns):
        return last_error
    return "ok" if last_ok_unix_ns is not None else None


def telemetry_status(db_path: Path) -> dict[str, Any]:
    """Rows by type, backlog, quarantined rows, loss counters and last upload of a store.

    Opens the file read-only (never creates it); a missing or unreadable file gives a
    dict with "exists" False or an "error" string instead of an exception.
    """
    db_path = Path(db_path)
    status: dict[str, Any] = {"db_path": str(db_path), "exists": db_path.exists()}
    if not status["exists"]:
        return status
    status["file_bytes"] = _file_bytes(db_path)
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        status["error"] = f"cannot open: {exc}"
        return status
    try:
        rows = {"event": 0, "summary": 0, "sample": 0}
        for row_type, count in conn.execute("SELECT type, COUNT(*) FROM records GROUP BY type"):
            rows[str(row_type)] = int(count)
        status["rows"] = rows
        backlog, quarantined, oldest, newest, backlog_bytes = conn.execute(
            "SELECT COALESCE(SUM(quarantined = 0), 0), COALESCE(SUM(quarantined), 0),"
            " MIN(time_unix_ns), MAX(time_unix_ns),"
            " COALESCE(SUM(CASE WHEN quarantined = 0 THEN size_bytes END), 0) FROM records"
        ).fetchone()
        status.update(
            backlog_rows=int(backlog),
            backlog_bytes=int(backlog_bytes),
            quarantined_rows=int(quarantined),
            oldest_unix_ns=oldest,
            newest_unix_ns=newest,
        )
        status["counters"] = {
            str(k): int(v)
            for k, v in conn.execute("SELECT name, value FROM counters ORDER BY name")
        }
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        last_ok = meta.get("upload.last_ok_unix_ns")
        error_at = meta.get("upload.last_error_unix_ns")
        status["last_upload_ok_unix_ns"] = int(last_ok) if last_ok else None
        status["last_upload_error"] = meta.get("upload.last_error")
        status["last_upload_error_unix_ns"] = int(error_at) if error_at else None
        status["upload"] = upload_summary(
            status["last_upload_error"],
            status["last_upload_error_unix_ns"],
            status["last_upload_ok_unix_ns"],
        )
        status["last_quarantine_reason"] = meta.get("last_quarantine_reason")
    except sqlite3.Error as exc:
        status["error"] = f"cannot read: {exc}"
    finally:
        conn.close()
    return status


def read_drift(db_path: Path) -> dict[str, Any] | None:
    """The last telemetry summary's drift figures for the active model (the store keeps
    them in its meta table: summaries leave the store once uploaded); None when there are
    none or the store cannot be read."""
    import json

    if not Path(db_path).exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'drift.last'").fetchone()
        value = json.loads(row[0]) if row else None
    except (sqlite3.Error, ValueError, TypeError):
        return None
    finally:
        conn.close()
    return value if isinstance(value, dict) else None
