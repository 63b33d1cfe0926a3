"""Opening the agent's SQLite files the same way everywhere: WAL, a busy timeout, a schema."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
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


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on an autocommit connection from :func:`open_db`.

    ``BEGIN IMMEDIATE`` takes the write lock up front (waiting up to the connection's busy
    timeout, then raising ``sqlite3.OperationalError: database is locked``), so a
    read-then-write inside cannot fail half way on a lock. The block's end commits; any
    exception, also one from COMMIT itself (disk full, I/O error), rolls back and is
    re-raised: a transaction left open would make every later BEGIN fail for the life of
    the connection. Nesting is refused: SQLite raises ``OperationalError`` ("cannot start a
    transaction within a transaction") from the inner BEGIN, before anything is rolled
    back, and the outer block then rolls back if that error leaves it. Callers wrap
    ``sqlite3.Error`` into their own family from agent/errors.py.
    """
    # BEGIN outside the try: a failed BEGIN (locked, nested) has nothing of ours to undo.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
