"""Opening the agent's SQLite files the same way everywhere: WAL, a busy timeout, a schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

from agent.errors import EdgeAgentError


def open_db(
    path: Path,
    schema: str,
    *,
    what: str,
    error: type[EdgeAgentError],
    synchronous: Literal["NORMAL", "FULL"] = "FULL",
    timeout_s: float = 10.0,
    check_same_thread: bool = False,
) -> sqlite3.Connection:
    """Open (creating if needed) a WAL database in autocommit mode and apply ``schema``.

    FULL makes a commit survive a power cut (journals, high-water marks); NORMAL is enough
    where the last transactions may be lost but the file must stay consistent. A failure is
    raised as ``error`` naming the file and ``what`` it holds.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            str(path),
            timeout=timeout_s,
            isolation_level=None,
            check_same_thread=check_same_thread,
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(schema)
    except (sqlite3.Error, OSError) as exc:
        raise error(f"{path}: cannot open the {what} ({exc})") from None
    return db
