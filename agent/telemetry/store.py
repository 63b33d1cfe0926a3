"""The telemetry store: one SQLite file (WAL), a byte budget with eviction by priority,
full-disk and corruption handling; rows keyed by (device_id, boot_id, seq)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.errors import TelemetryError
from agent.sqlitedb import write_transaction
from agent.telemetry import jsonsafe
from agent.telemetry.ratelimit import warn_every

log = logging.getLogger(__name__)

RowType = Literal["event", "summary", "sample"]
ROW_TYPES: tuple[RowType, ...] = ("sample", "summary", "event")

# Eviction order: lowest first. OTA, governor (thermal), error and the store's own events
# are "critical" and go last.
PRIORITY_SAMPLE = 0
PRIORITY_SUMMARY = 1
PRIORITY_EVENT = 2
PRIORITY_CRITICAL = 3
PRIORITY_NAMES = {
    "sample": PRIORITY_SAMPLE,
    "summary": PRIORITY_SUMMARY,
    "event": PRIORITY_EVENT,
    "critical": PRIORITY_CRITICAL,
}
CRITICAL_EVENT_PREFIXES = ("ota.", "governor.", "error", "telemetry.", "clock.", "daemon.")

# Per-row bookkeeping SQLite spends beyond the payload (rowid, keys, index entries).
ROW_OVERHEAD_BYTES = 96
# Evict down to this fraction of the budget, so eviction runs in bursts, not every insert.
EVICT_TARGET_FRACTION = 0.9
SQLITE_FULL = 13
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

# Per-signal acknowledgement bits in records.acked. A summary row goes out twice, in the
# metrics request and in the logs request: it is deleted once both were acknowledged,
# and a signal already acknowledged is never sent again (a Collector would count twice).
SIGNAL_METRICS = 1
SIGNAL_LOGS = 2
SIGNAL_BITS = {"metrics": SIGNAL_METRICS, "logs": SIGNAL_LOGS}
# SQL: every signal this row goes out in was acknowledged (summaries: both, others: logs)
_FULLY_ACKED = (
    f"(acked & {SIGNAL_LOGS}) != 0 AND (type != 'summary' OR (acked & {SIGNAL_METRICS}) != 0)"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    name TEXT NOT NULL,
    time_unix_ns INTEGER NOT NULL,
    observed_unix_ns INTEGER NOT NULL,
    clock_ok INTEGER NOT NULL,
    attrs TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    quarantined INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    UNIQUE (device_id, boot_id, seq)
);
CREATE INDEX IF NOT EXISTS records_backlog ON records (quarantined, id);
CREATE INDEX IF NOT EXISTS records_evict ON records (priority, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class NewRecord:
    """A row before it has a seq: what the recorder hands to the store."""

    type: RowType
    priority: int
    name: str
    time_unix_ns: int
    observed_unix_ns: int
    clock_ok: bool
    attrs: Mapping[str, Any]


@dataclass(frozen=True)
class StoredRecord:
    """A row as stored, with its identity; what the uploader sends."""

    id: int
    device_id: str
    boot_id: str
    seq: int
    type: RowType
    priority: int
    name: str
    time_unix_ns: int
    observed_unix_ns: int
    clock_ok: bool
    attrs: dict[str, Any]
    size_bytes: int
    acked: int = 0  # SIGNAL_* bits already acknowledged by the server

    def needs(self, signal: str) -> bool:
        """True when this row still has to go out in ``signal``'s request."""
        if signal == "metrics" and self.type != "summary":
            return False
        return not self.acked & SIGNAL_BITS[signal]


@dataclass
class AppendResult:
    """What happened to one batch: seqs committed, rows dropped (and why)."""

    seqs: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)


def _encode_attrs(attrs: Mapping[str, Any]) -> str:
    # NaN/Inf stored as null: json.loads would hand them back as floats no OTLP reader takes
    return jsonsafe.dumps(attrs, separators=(",", ":"), sort_keys=True, default=str)


def _errorcode(exc: sqlite3.Error) -> int:
    code = getattr(exc, "sqlite_errorcode", None)
    # sqlite_errorcode can be an extended code; the primary code is the low byte.
    return (code & 0xFF) if isinstance(code, int) else -1


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return _errorcode(exc) == SQLITE_FULL or "database or disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def is_corrupt(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    text = str(exc)
    return (
        _errorcode(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB)
        or "malformed" in text
        or "not a database" in text
    )


def is_locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


def quarantine_database(db_path: Path, reason: str) -> Path:
    """Move a broken database (and its -wal/-shm) aside; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = db_path.with_name(f"{db_path.name}.corrupt-{stamp}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{db_path}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{target}{suffix}"))
    log.error("telemetry database %s quarantined as %s: %s", db_path, target.name, reason)
    return target


class TelemetryStore:
    """One connection to telemetry.db. Not thread-safe: one store per thread.

    The recorder's writer thread is the only one that inserts; the uploader uses its own
    store to read batches and delete what the server acknowledged.
    """

    def __init__(
        self,
        db_path: Path,
        device_id: str,
        boot_id: str,
        max_bytes: int = 64 << 20,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_s: float = 5.0,
        max_page_count: int | None = None,
        check_integrity: bool = True,
    ) -> None:
        self.db_path = db_path
        self.device_id = device_id
        self.boot_id = boot_id
        self.max_bytes = max_bytes
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        # max_page_count is SQLite's own size cap; tests use it to hit SQLITE_FULL for real.
        self.max_page_count = max_page_count
        self.quarantined_to: list[Path] = []
        self._next_seq = 0
        self._conn = self._open(check_integrity)

    # -- opening, corruption ------------------------------------------------------------

    def _open(self, check_integrity: bool) -> sqlite3.Connection:
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TelemetryError(f"{self.db_path.parent}: cannot create ({exc.strerror})") from None
        for attempt in range(2):
            fresh = not self.db_path.exists()
            try:
                conn = self._connect(fresh, check_integrity)
            except sqlite3.DatabaseError as exc:
                if attempt == 0 and is_corrupt(exc):
                    self.quarantined_to.append(quarantine_database(self.db_path, str(exc)))
                    continue
                raise TelemetryError(f"{self.db_path}: cannot open ({exc})") from None
            self._next_seq = self._initial_seq(conn, fresh)
            return conn
        raise TelemetryError(f"{self.db_path}: still corrupt after quarantine")  # pragma: no cover

    def _connect(self, fresh: bool, check_integrity: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.db_path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            if fresh:
                # Incremental vacuum lets eviction hand pages back to the file system.
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if self.max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count={int(self.max_page_count)}").fetchone()
            if check_integrity and not fresh:
                result = conn.execute("PRAGMA quick_check").fetchone()
                if result is None or result[0] != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed ({result})")
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
            if "acked" not in columns:
                # a store written before per-signal acknowledgement: nothing acked yet
                conn.execute("ALTER TABLE records ADD COLUMN acked INTEGER NOT NULL DEFAULT 0")
        except BaseException:
            conn.close()
            raise
        return conn

    def _initial_seq(self, conn: sqlite3.Connection, fresh: bool) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (self._seq_key,)).fetchone()
        if row is not None:
            return int(row[0])
        if fresh or self.quarantined_to:
            # A new file in a boot that may already have sent rows (after a quarantine or
            # an operator deleting it): start past any seq used earlier in this boot.
            # CLOCK_MONOTONIC starts at boot, and no process issues a seq per microsecond.
            return time.monotonic_ns() // 1000
        return 1

    @property
    def _seq_key(self) -> str:
        return f"next_seq:{self.device_id}:{self.boot_id}"

    def recover_from_corruption(self, reason: str) -> Path:
        """Quarantine the current file and start a fresh one; the caller records an event."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        target = quarantine_database(self.db_path, reason)
        self.quarantined_to.append(target)
        self._conn = self._open(check_integrity=False)
        return target

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()

    def __enter__(self) -> TelemetryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn

    # -- writing ------------------------------------------------------------------------

    def append(self, records: Sequence[NewRecord]) -> list[int]:
        """Insert a batch in one transaction; returns the seqs. Raises sqlite3 errors."""
        if not records:
            return []
        seq = self._next_seq
        rows = []
        seqs = []
        last_time = 0
        for rec in records:
            attrs = _encode_attrs(rec.attrs)
            size = len(attrs) + len(rec.name) + ROW_OVERHEAD_BYTES
            rows.append(
                (
                    self.device_id,
                    self.boot_id,
                    seq,
                    rec.type,
                    rec.priority,
                    rec.name,
                    rec.time_unix_ns,
                    rec.observed_unix_ns,
                    int(rec.clock_ok),
                    attrs,
                    size,
                )
            )
            seqs.append(seq)
            seq += 1
            if rec.clock_ok:
                last_time = max(last_time, rec.time_unix_ns)
        with write_transaction(self._conn) as conn:
            conn.executemany(
                "INSERT INTO records (device_id, boot_id, seq, type, priority, name,"
                " time_unix_ns, observed_unix_ns, clock_ok, attrs, size_bytes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (self._seq_key, str(seq))
            )
            if last_time:
                # the latest good time, not the highest ever: a clock that once ran years
                # ahead must not leave a mark that later runs treat as the time
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_good_unix_ns', ?)",
                    (str(last_time),),
                )
        self._next_seq = seq
        return seqs

    def append_resilient(self, records: Sequence[NewRecord]) -> AppendResult:
        """Insert a batch; on a full disk evict, retry, then drop low-priority rows.

        Raises sqlite3 errors other than SQLITE_FULL/ENOSPC (locked, corrupt) unchanged:
        the recorder decides whether to keep the batch or quarantine the file.
        """
        result = AppendResult()
        pending = list(records)
        for stage in range(4):
            try:
                result.seqs = self.append(pending)
                break
            except (sqlite3.Error, OSError) as exc:
                if not is_disk_full(exc):
                    raise
                warn_every(
                    log, "store:full", 60.0, "telemetry store full (%s), stage %d", exc, stage
                )
                if stage == 0:
                    # Make room by evicting old rows below the critical ones, then retry.
                    amount = max(self.used_bytes() // 4, 64 << 10)
                    with contextlib.suppress(sqlite3.Error, OSError):
                        self.evict_bytes(amount, max_priority=PRIORITY_EVENT, reason="full")
                else:
                    # Still full: drop the new rows, lowest priority first, and count them.
                    keep_above = (PRIORITY_SUMMARY, PRIORITY_EVENT, PRIORITY_CRITICAL)[stage - 1]
                    pending = self._drop(pending, keep_above, result)
                if not pending:
                    break
        self.count_dropped(result.dropped, prefix="dropped_full")
        if result.seqs:
            self.enforce_budget()
        return result

    @staticmethod
    def _drop(pending: list[NewRecord], max_priority: int, result: AppendResult) -> list[NewRecord]:
        kept = []
        for rec in pending:
            if rec.priority <= max_priority:
                result.dropped[rec.type] = result.dropped.get(rec.type, 0) + 1
            else:
                kept.append(rec)
        return kept

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        deltas = {k: v for k, v in deltas.items() if v}
        if not deltas:
            return
        with write_transaction(self._conn) as conn:
            conn.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                list(deltas.items()),
            )

    def count_dropped(self, dropped: Mapping[str, int], prefix: str) -> None:
        if not dropped:
            return
        # A disk so full that even a counter cannot be written: keep inference going.
        with contextlib.suppress(sqlite3.Error, OSError):
            self.add_counters({f"{prefix}.{t}": n for t, n in dropped.items()})

    def set_meta(self, key: str, value: str) -> None:
        with write_transaction(self._conn) as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- budget and eviction ------------------------------------------------------------

    def used_bytes(self) -> int:
        page_size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def enforce_budget(self) -> dict[str, int]:
        """Evict by priority when the file's used pages exceed max_bytes."""
        used = self.used_bytes()
        if used <= self.max_bytes:
            return {}
        return self.evict_bytes(used - int(self.max_bytes * EVICT_TARGET_FRACTION), reason="budget")

    def evict_bytes(
        self, amount_bytes: int, max_priority: int = PRIORITY_CRITICAL, reason: str = "budget"
    ) -> dict[str, int]:
        """Delete about amount_bytes of rows: lowest priority first, oldest first."""
        evicted: dict[str, int] = {}
        remaining = amount_bytes
        with write_transaction(self._conn) as conn:
            for priority in range(max_priority + 1):
                while remaining > 0:
                    rows = conn.execute(
                        "SELECT id, type, size_bytes FROM records WHERE priority = ?"
                        " ORDER BY id LIMIT 500",
                        (priority,),
                    ).fetchall()
                    if not rows:
                        break
                    ids = []
                    for row_id, row_type, size in rows:
                        ids.append((row_id,))
                        evicted[row_type] = evicted.get(row_type, 0) + 1
                        remaining -= size
                        if remaining <= 0:
                            break
                    conn.executemany("DELETE FROM records WHERE id = ?", ids)
                if remaining <= 0:
                    break
            conn.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                [(f"evicted.{t}", n) for t, n in evicted.items()],
            )
        if evicted:
            log.info("telemetry evicted %s (%s)", evicted, reason)
            # Give the freed pages back to the file system (matters when the disk is full).
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA incremental_vacuum").fetchall()
        return evicted

    # -- reading and acknowledging (uploader) ----------------------------------------------

    def backlog(self, max_rows: int, max_bytes: int) -> list[StoredRecord]:
        """The oldest rows not yet acknowledged, up to max_rows and about max_bytes."""
        cursor = self._conn.execute(
            "SELECT id, device_id, boot_id, seq, type, priority, name, time_unix_ns,"
            " observed_unix_ns, clock_ok, attrs, size_bytes, acked FROM records"
            " WHERE quarantined = 0 ORDER BY id LIMIT ?",
            (max_rows,),
        )
        out: list[StoredRecord] = []
        total = 0
        for row in cursor:
            size = int(row[11])
            if out and total + size > max_bytes:
                break
            total += size
            out.append(_stored(row))
        cursor.close()
        return out

    def delete(self, ids: Iterable[int]) -> int:
        """Delete rows the server acknowledged."""
        params = [(i,) for i in ids]
        with write_transaction(self._conn) as conn:
            before = conn.total_changes
            conn.executemany("DELETE FROM records WHERE id = ?", params)
            deleted = conn.total_changes - before
            conn.execute(
                "INSERT INTO counters (name, value) VALUES ('uploaded.rows', ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (deleted,),
            )
        return deleted

    def acknowledge(self, records: Iterable[StoredRecord], signal: str) -> int:
        """Mark ``signal`` acknowledged for these rows; delete those with nothing left to send.

        Judged on the stored bits, not the caller's copies (which predate the other
        signal's ack). Returns how many rows were deleted (counted in uploaded.rows).
        """
        bit = SIGNAL_BITS[signal]
        ids = [(rec.id,) for rec in records]
        with write_transaction(self._conn) as conn:
            conn.executemany(f"UPDATE records SET acked = acked | {bit} WHERE id = ?", ids)
            before = conn.total_changes
            conn.executemany(f"DELETE FROM records WHERE id = ? AND {_FULLY_ACKED}", ids)
            deleted = conn.total_changes - before
            if deleted:
                conn.execute(
                    "INSERT INTO counters (name, value) VALUES ('uploaded.rows', ?)"
                    " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (deleted,),
                )
        return deleted

    def quarantine_rows(self, ids: Iterable[int], reason: str) -> None:
        """Keep rows the server refused (HTTP 400) for inspection, never to resend."""
        params = [(i,) for i in ids]
        with write_transaction(self._conn) as conn:
            conn.executemany("UPDATE records SET quarantined = 1 WHERE id = ?", params)
            conn.execute(
                "INSERT INTO counters (name, value) VALUES ('quarantined.batches', 1)"
                " ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_quarantine_reason', ?)",
                (reason[:500],),
            )

    def counters(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._conn.execute("SELECT name, value FROM counters")}


def _stored(row: Sequence[Any]) -> StoredRecord:
    return StoredRecord(
        id=int(row[0]),
        device_id=str(row[1]),
        boot_id=str(row[2]),
        seq=int(row[3]),
        type=row[4],
        priority=int(row[5]),
        name=str(row[6]),
        time_unix_ns=int(row[7]),
        observed_unix_ns=int(row[8]),
        clock_ok=bool(row[9]),
        attrs=json.loads(row[10]),
        size_bytes=int(row[11]),
        acked=int(row[12]),
    )
