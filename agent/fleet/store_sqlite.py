"""The fleet telemetry store on one SQLite file (the default backend)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.errors import TelemetryError
from agent.fleet.store import SCHEMA, StatementRunner, T, TelemetryStore
from agent.sqlitedb import open_db, write_transaction


class _SQLiteRunner:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def run(self, sql: str, args: Sequence[Any]) -> int:
        return self.db.execute(sql, args).rowcount

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        return self.db.executemany(sql, rows).rowcount if rows else 0


class SQLiteTelemetryStore(TelemetryStore):
    """One SQLite file (WAL) shared by the request handlers and the rollout controller."""

    arrival_column = "rowid"

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.where = str(db_path)
        self._lock = threading.Lock()
        self._db = open_db(
            db_path,
            SCHEMA,
            what="fleet telemetry database",
            error=TelemetryError,
            synchronous="NORMAL",
            timeout_s=5.0,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, what: str, work: Callable[[StatementRunner], T]) -> T:
        with self._lock:
            try:
                with write_transaction(self._db) as db:
                    result = work(_SQLiteRunner(db))
            except sqlite3.Error as exc:
                raise TelemetryError(f"{self.where}: cannot store {what} ({exc})") from None
        return result

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args))
            except sqlite3.Error as exc:
                raise TelemetryError(f"{self.where}: query failed ({exc})") from None
