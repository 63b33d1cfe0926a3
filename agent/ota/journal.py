"""The OTA journal in state.db: each state saved (fsync) before its work, refusals, marks."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import DowngradeError, StateError
from agent.ota.killpoint import kill_point
from agent.ota.states import AT_REST, OTAState, check_transition, parse_state
from agent.sqlitedb import open_db, write_transaction

# ota_values key of the last gate report (the service writes it, status reads it)
LAST_GATE_REPORT = "last_gate_report"
# ota_values row with the last channel check's time and outcome (checks that change
# nothing are not journaled; status reads this instead)
LAST_CHECK = "last_check"
# ota_values row with the poll loop's last and next poll (for `status --watch`)
LAST_POLL = "last_poll"
# At-rest rows kept in ota_journal; older ones are pruned as new rows arrive (the last row
# of each end state is always kept: status shows them).
KEEP_ROWS = 200
# The end states whose newest row status reads (what runs, and the last attempt's outcome).
END_STATES: tuple[OTAState, ...] = (
    OTAState.COMMITTED,
    OTAState.REJECTED,
    OTAState.ROLLED_BACK,
)
_COLUMNS = "seq, txn, ts, state, package, version, from_version, reason, channel, detail"

SCHEMA = """
CREATE TABLE IF NOT EXISTS ota_journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    txn INTEGER NOT NULL,
    ts REAL NOT NULL,
    state TEXT NOT NULL,
    package TEXT NOT NULL DEFAULT '',
    version TEXT NOT NULL DEFAULT '',
    from_version TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    channel TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS ota_refusals (
    package TEXT NOT NULL,
    version TEXT NOT NULL,
    channel_key TEXT NOT NULL,
    reason TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (package, version)
);
CREATE TABLE IF NOT EXISTS ota_marks (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ota_values (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class JournalEntry:
    """One saved state of one update attempt (``txn`` groups the rows of an attempt)."""

    seq: int
    txn: int
    ts: float
    state: OTAState
    package: str = ""
    version: str = ""
    from_version: str = ""
    reason: str = ""
    channel: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "txn": self.txn,
            "ts": self.ts,
            "state": self.state.value,
            "package": self.package,
            "version": self.version,
            "from_version": self.from_version,
            "reason": self.reason,
            "channel": self.channel,
            "detail": dict(self.detail),
        }


class Journal:
    """The OTA state machine's durable memory (SQLite, WAL, synchronous=FULL).

    ``enter()`` commits the new state before returning, so the caller does the state's
    work only once the state is on disk; a kill at any point leaves either the old or the
    new row, never half of one.
    """

    def __init__(
        self,
        db_path: Path,
        clock: Callable[[], float] = time.time,
        *,
        keep_rows: int = KEEP_ROWS,
        readonly: bool = False,
    ) -> None:
        self.db_path = db_path
        self._clock = clock
        self._lock = threading.RLock()
        self.keep_rows = keep_rows
        if readonly:
            # `edge-agent status` reads beside a running daemon: it must never write
            # (no schema, no journal-mode change), so a CLI is never a second writer.
            self._db = open_readonly(db_path, what="OTA journal")
            return
        # FULL: a committed state survives a power cut, which is the journal's job.
        self._db = open_db(
            db_path,
            SCHEMA,
            what="OTA journal",
            error=StateError,
            synchronous="FULL",
            timeout_s=30.0,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                # Rolls back also when COMMIT itself fails (disk full, I/O error): a
                # transaction left open would wedge the journal for the process's life.
                with write_transaction(self._db) as db:
                    yield db
            except sqlite3.Error as exc:
                raise StateError(f"{self.db_path}: OTA journal write failed ({exc})") from None

    # ---- states ----

    def last(self) -> JournalEntry | None:
        """The most recent saved state, or None on a fresh device."""
        with self._lock:
            try:
                row = self._db.execute(
                    f"SELECT {_COLUMNS} FROM ota_journal ORDER BY seq DESC LIMIT 1"
                ).fetchone()
            except sqlite3.Error as exc:
                raise StateError(f"{self.db_path}: cannot read the OTA journal ({exc})") from None
        return _entry(row) if row else None

    def state(self) -> OTAState:
        entry = self.last()
        return entry.state if entry else OTAState.IDLE

    def history(self, limit: int = 50) -> list[JournalEntry]:
        """The last ``limit`` saved states, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM ota_journal ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_entry(r) for r in reversed(rows)]

    def last_in(self, states: tuple[OTAState, ...]) -> JournalEntry | None:
        """The newest row in one of ``states`` (e.g. the last COMMITTED or ROLLED_BACK)."""
        marks = ", ".join("?" for _ in states)
        with self._lock:
            try:
                row = self._db.execute(
                    f"SELECT {_COLUMNS} FROM ota_journal WHERE state IN ({marks}) "
                    "ORDER BY seq DESC LIMIT 1",
                    tuple(s.value for s in states),
                ).fetchone()
            except sqlite3.Error as exc:
                raise StateError(f"{self.db_path}: cannot read the OTA journal ({exc})") from None
        return _entry(row) if row else None

    def rows(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM ota_journal").fetchone()[0])

    def seed(
        self,
        state: OTAState,
        *,
        package: str,
        version: str,
        reason: str,
        detail: Mapping[str, Any] | None = None,
    ) -> JournalEntry:
        """The first row of a rebuilt journal (an at-rest state with no transition before it).

        Only for a journal that is empty: a quarantined state.db rebuilt from the links.
        """
        if state not in AT_REST:
            raise StateError(f"OTA journal: cannot seed the in-flight state {state.value}")
        with self._write() as db:
            if db.execute("SELECT count(*) FROM ota_journal").fetchone()[0]:
                raise StateError(f"{self.db_path}: OTA journal is not empty; not seeding it")
            cur = db.execute(
                "INSERT INTO ota_journal (txn, ts, state, package, version, reason, detail) "
                "VALUES (0, ?, ?, ?, ?, ?, ?)",
                (
                    self._clock(),
                    state.value,
                    package,
                    version,
                    reason,
                    json.dumps(dict(detail or {}), sort_keys=True),
                ),
            )
            seq = int(cur.lastrowid or 0)
            db.execute("UPDATE ota_journal SET txn = ? WHERE seq = ?", (seq, seq))
        entry = self.last()
        assert entry is not None
        return entry

    def enter(
        self,
        state: OTAState,
        *,
        package: str | None = None,
        version: str | None = None,
        from_version: str | None = None,
        reason: str = "",
        channel: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> JournalEntry:
        """Save ``state`` durably after checking the transition table.

        A move out of an at-rest state starts a new attempt (txn); otherwise package,
        version, from_version, channel and detail carry over from the attempt's last row
        unless given.
        """
        kill_point(f"journal.before:{state.value}")
        with self._write() as db:
            prev = db.execute(
                f"SELECT {_COLUMNS} FROM ota_journal ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            last = _entry(prev) if prev else None
            current = last.state if last else OTAState.IDLE
            check_transition(current, state)
            new_txn = last is None or current in AT_REST
            carry = last if (last is not None and not new_txn) else None
            merged_detail: dict[str, Any] = dict(carry.detail) if carry else {}
            merged_detail.update(detail or {})
            values = (
                package if package is not None else (carry.package if carry else ""),
                version if version is not None else (carry.version if carry else ""),
                from_version if from_version is not None else (carry.from_version if carry else ""),
                reason,
                channel if channel is not None else (carry.channel if carry else ""),
                json.dumps(merged_detail, sort_keys=True),
            )
            cur = db.execute(
                "INSERT INTO ota_journal (txn, ts, state, package, version, from_version, "
                "reason, channel, detail) VALUES (0, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self._clock(), state.value, *values),
            )
            seq = int(cur.lastrowid or 0)
            txn = seq if new_txn or last is None else last.txn
            db.execute("UPDATE ota_journal SET txn = ? WHERE seq = ?", (txn, seq))
            if state in AT_REST:
                self._prune(db, seq)
        kill_point(f"journal.saved:{state.value}")
        entry = self.last()
        assert entry is not None
        return entry

    def _prune(self, db: sqlite3.Connection, newest_seq: int) -> None:
        """Keep the journal bounded: drop rows older than the last ``keep_rows``, except
        the newest row of each end state (status shows what runs and the last outcome).

        Runs only when an attempt came to rest, so no in-flight attempt loses its rows.
        """
        marks = ", ".join("?" for _ in END_STATES)
        db.execute(
            "DELETE FROM ota_journal WHERE seq <= ? AND seq NOT IN "
            f"(SELECT max(seq) FROM ota_journal WHERE state IN ({marks}) GROUP BY state)",
            (newest_seq - self.keep_rows, *(s.value for s in END_STATES)),
        )

    def release_floor(self, name: str) -> int | None:
        """The release floor (agent.package.ReleaseFloor's table) read on this connection,
        so a read-only journal can show it; None when nothing was committed."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT release_counter FROM release_floor WHERE name = ?", (name,)
                ).fetchone()
            except sqlite3.OperationalError:  # no such table: nothing committed yet
                return None
        return None if row is None else int(row[0])

    # ---- refusals: not retried until the channel changes ----

    def record_refusal(self, package: str, version: str, channel_key: str, reason: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO ota_refusals (package, version, channel_key, reason, ts) "
                "VALUES (?, ?, ?, ?, ?)",
                (package, version, channel_key, reason, self._clock()),
            )

    def refusal(self, package: str, version: str, channel_key: str) -> str | None:
        """The recorded reason when this version was refused under the same channel state."""
        with self._lock:
            row = self._db.execute(
                "SELECT reason FROM ota_refusals WHERE package = ? AND version = ? "
                "AND channel_key = ?",
                (package, version, channel_key),
            ).fetchone()
        return str(row[0]) if row else None

    def last_refusal(self) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT package, version, reason, ts FROM ota_refusals ORDER BY ts DESC LIMIT 1"
            ).fetchone()
        if not row:
            return None
        return {"package": row[0], "version": row[1], "reason": row[2], "ts": row[3]}

    # ---- high-water marks (never move backwards) and small values ----

    def mark(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM ota_marks WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def raise_mark(self, name: str, value: int) -> int:
        """Raise a high-water mark to ``value``; DowngradeError when ``value`` is below it."""
        with self._write() as db:
            row = db.execute("SELECT value FROM ota_marks WHERE name = ?", (name,)).fetchone()
            old = int(row[0]) if row else 0
            if value < old:
                raise DowngradeError(f"{name}: {value} is below the high-water mark {old}")
            db.execute(
                "INSERT OR REPLACE INTO ota_marks (name, value) VALUES (?, ?)", (name, value)
            )
        return max(old, value)

    def marks(self, prefix: str = "") -> dict[str, int]:
        """Every high-water mark whose name starts with ``prefix``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, value FROM ota_marks WHERE substr(name, 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def delete_mark(self, name: str) -> None:
        """Forget a mark (only for moving it elsewhere, e.g. floors to ReleaseFloor)."""
        with self._write() as db:
            db.execute("DELETE FROM ota_marks WHERE name = ?", (name,))

    def get_value(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM ota_values WHERE name = ?", (name,)
            ).fetchone()
        return str(row[0]) if row else None

    def set_value(self, name: str, value: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO ota_values (name, value) VALUES (?, ?)", (name, value)
            )

    def delete_value(self, name: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM ota_values WHERE name = ?", (name,))


def open_readonly(db_path: Path, *, what: str) -> sqlite3.Connection:
    """A read-only connection to an existing state.db (StateError when it cannot open)."""
    try:
        return sqlite3.connect(
            f"{db_path.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=10.0,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise StateError(f"{db_path}: cannot open the {what} ({exc})") from None


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    try:
        detail = json.loads(row[9]) if row[9] else {}
    except json.JSONDecodeError:
        detail = {"unreadable": row[9]}
    return JournalEntry(
        seq=int(row[0]),
        txn=int(row[1]),
        ts=float(row[2]),
        state=parse_state(str(row[3])),
        package=str(row[4]),
        version=str(row[5]),
        from_version=str(row[6]),
        reason=str(row[7]),
        channel=str(row[8]),
        detail=detail,
    )
