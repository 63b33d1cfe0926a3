"""Anti-downgrade: the per-package-name release_counter high-water mark in the state DB."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from agent.errors import DowngradeError, StateError
from agent.sqlitedb import open_db, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS release_floor (
    name TEXT PRIMARY KEY,
    release_counter INTEGER NOT NULL,
    version TEXT NOT NULL,
    updated TEXT NOT NULL
)
"""


class ReleaseFloor:
    """The highest release_counter committed per package name; it only ever rises.

    Kept in SQLite with synchronous=FULL so a raised floor survives a power cut.
    """

    def __init__(self, state_db_path: Path):
        self.path = Path(state_db_path)
        self._db = open_db(
            self.path, SCHEMA, what="release floor", error=StateError, check_same_thread=True
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReleaseFloor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, name: str) -> int | None:
        """The floor for ``name``, or None when nothing of that name was ever committed."""
        try:
            row = self._db.execute(
                "SELECT release_counter FROM release_floor WHERE name = ?", (name,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the release floor ({exc})") from None
        return None if row is None else int(row[0])

    def check(self, name: str, release_counter: int, allow_revert: bool = False) -> None:
        """Refuse a counter below the floor unless the channel signed an explicit revert."""
        floor = self.get(name)
        if floor is not None and release_counter < floor and not allow_revert:
            raise DowngradeError(
                f"{name}: release_counter {release_counter} is below this device's floor "
                f"{floor} (a downgrade; only a signed revert may install it)"
            )

    def raise_to(self, name: str, release_counter: int, version: str) -> int:
        """Raise the floor to ``release_counter`` (never lowers it); returns the new floor."""
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            with write_transaction(self._db) as db:
                db.execute(
                    "INSERT INTO release_floor (name, release_counter, version, updated) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "release_counter = excluded.release_counter, version = excluded.version, "
                    "updated = excluded.updated "
                    "WHERE excluded.release_counter > release_floor.release_counter",
                    (name, release_counter, version, now),
                )
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot raise the release floor ({exc})") from None
        floor = self.get(name)
        assert floor is not None
        return floor
