"""agent.sqlitedb.write_transaction on real SQLite files: commit, rollback, nesting, a busy lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.errors import StateError
from agent.sqlitedb import open_db, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS child (
  id INTEGER PRIMARY KEY,
  parent_id INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED
);
"""


class Boom(Exception):
    """The caller's own failure inside the block."""


def _open(path: Path, timeout_s: float = 10.0) -> sqlite3.Connection:
    db = open_db(path, SCHEMA, what="test database", error=StateError, timeout_s=timeout_s)
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _insert_parent(db: sqlite3.Connection) -> None:
    with write_transaction(db) as tx:
        tx.execute("INSERT INTO parent (id) VALUES (1)")


def _raise_inside(db: sqlite3.Connection) -> None:
    with write_transaction(db) as tx:
        tx.execute("INSERT INTO parent (id) VALUES (1)")
        raise Boom("the caller failed half way")


def _commit_fails(db: sqlite3.Connection) -> None:
    # A deferred foreign key is checked at COMMIT: COMMIT itself fails, as on a full disk.
    with write_transaction(db) as tx:
        tx.execute("INSERT INTO parent (id) VALUES (1)")
        tx.execute("INSERT INTO child (id, parent_id) VALUES (1, 99)")


def _nested(db: sqlite3.Connection) -> None:
    with write_transaction(db) as tx:
        tx.execute("INSERT INTO parent (id) VALUES (1)")
        with write_transaction(db) as inner:
            inner.execute("INSERT INTO parent (id) VALUES (2)")


def _nested_caught(db: sqlite3.Connection) -> None:
    # The refused inner BEGIN undoes nothing: the outer block still commits its own row.
    with write_transaction(db) as tx:
        tx.execute("INSERT INTO parent (id) VALUES (1)")
        refused = pytest.raises(sqlite3.OperationalError, match="within a transaction")
        with refused, write_transaction(db):
            pass


@dataclass(frozen=True)
class Row:
    id: str
    fault: str  # what the caller or the fault controls
    work: Callable[[sqlite3.Connection], None]
    raises: type[BaseException] | None
    message: str  # matched against the raised error
    rows_after: int  # parent rows a fresh connection sees afterwards
    other_holds_lock: bool = False  # a second real connection holds the write lock meanwhile


ROWS = [
    Row("commit", "nothing fails", _insert_parent, None, "", 1),
    Row("exception-rolls-back", "the block raises", _raise_inside, Boom, "half way", 0),
    Row(
        "commit-fails-rolls-back",
        "COMMIT itself fails (deferred foreign key)",
        _commit_fails,
        sqlite3.IntegrityError,
        "FOREIGN KEY",
        0,
    ),
    Row(
        "nested-refused",
        "a second transaction opened inside the first",
        _nested,
        sqlite3.OperationalError,
        "within a transaction",
        0,
    ),
    Row("nested-refused-caught", "the refusal caught inside", _nested_caught, None, "", 1),
    Row(
        "busy-after-timeout",
        "another connection holds the write lock past the busy timeout",
        _insert_parent,
        sqlite3.OperationalError,
        "locked",
        0,
        other_holds_lock=True,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_write_transaction(row: Row, tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    db = _open(path, timeout_s=0.2)
    holder = _open(path)
    if row.other_holds_lock:
        holder.execute("BEGIN IMMEDIATE")
    try:
        if row.raises is None:
            row.work(db)
        else:
            with pytest.raises(row.raises, match=row.message):
                row.work(db)
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
    # Never left inside a transaction: the next write on the same connection works.
    assert not db.in_transaction
    assert _count(path) == row.rows_after
    with write_transaction(db) as tx:
        tx.execute("INSERT INTO parent (id) VALUES (7)")
    assert _count(path) == row.rows_after + 1
    db.close()
    holder.close()


def _count(path: Path) -> int:
    fresh = _open(path)
    try:
        return int(fresh.execute("SELECT COUNT(*) FROM parent").fetchone()[0])
    finally:
        fresh.close()
