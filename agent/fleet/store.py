"""The fleet telemetry store's interface and SQL, shared by its SQLite and PostgreSQL backends."""

from __future__ import annotations

import json
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agent.errors import UsageError

# The OTLP parsing moved to agent.fleet.ingest; `as` re-exports keep the old import paths.
from agent.fleet.ingest import INT64_MAX as INT64_MAX
from agent.fleet.ingest import MAX_ATTR_TEXT, LogRow, MetricRow
from agent.fleet.ingest import MAX_RECORDS_PER_REQUEST as MAX_RECORDS_PER_REQUEST
from agent.fleet.ingest import MAX_VALUE_DEPTH as MAX_VALUE_DEPTH
from agent.fleet.ingest import BadPayloadError as BadPayloadError
from agent.fleet.ingest import parse_otlp_logs as parse_otlp_logs
from agent.fleet.ingest import parse_otlp_metrics as parse_otlp_metrics

# Idle and checking say nothing about an install, so they never hide a device's outcome.
IDLE_STATES = "('IDLE', 'CHECKING')"
# ota.state events carry model-quality figures as `quality.<name>` attributes (CONTRACTS.md);
# the store keeps finite numbers under short lower-case names, at most this many per event,
# so one device cannot fill the table with made-up figures.
QUALITY_PREFIX = "edge_agent.attr.quality."
QUALITY_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
MAX_QUALITY_FIGURES = 32


@dataclass(frozen=True)
class QualityRow:
    """One quality figure of one ota.state report, as the rollout controller reads it."""

    device_id: str
    version: str
    from_version: str
    state: str
    received_s: float
    name: str
    value: float


# ---------------------------------------------------------------------------------------
# The store: one interface and one set of statements over SQLite (default) or PostgreSQL
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int


# Both dialects take this DDL; only the types, the arrival column and the metrics key differ
# (filled in by each backend below), so the two schemas cannot drift apart by accident.
SCHEMA_TEMPLATE = """
CREATE TABLE IF NOT EXISTS logs (
  device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq {int64} NOT NULL,
  time_ns {int64} NOT NULL, type TEXT NOT NULL, event_name TEXT NOT NULL,
  body TEXT, attrs TEXT NOT NULL, received_s {float64} NOT NULL,
  PRIMARY KEY (device_id, boot_id, seq)
);
CREATE TABLE IF NOT EXISTS ota_states ({arrival_column_ddl}
  device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq {int64} NOT NULL,
  time_ns {int64} NOT NULL, package TEXT, version TEXT, from_version TEXT,
  state TEXT NOT NULL, reason TEXT, channel TEXT,
  PRIMARY KEY (device_id, boot_id, seq)
);
CREATE INDEX IF NOT EXISTS ota_states_by_version ON ota_states (package, version, time_ns);
CREATE TABLE IF NOT EXISTS ota_quality (
  device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq {int64} NOT NULL,
  name TEXT NOT NULL, value {float64} NOT NULL,
  PRIMARY KEY (device_id, boot_id, seq, name)
);
CREATE TABLE IF NOT EXISTS metrics (
  device_id TEXT NOT NULL, name TEXT NOT NULL, time_ns {int64} NOT NULL,
  value {float64}, attrs TEXT NOT NULL{metrics_key_ddl}
);{metrics_index_ddl}
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY, first_seen_s {float64} NOT NULL, last_seen_s {float64} NOT NULL
);
"""

SCHEMA = SCHEMA_TEMPLATE.format(
    int64="INTEGER",
    float64="REAL",
    arrival_column_ddl="",  # SQLite's rowid is the arrival order
    metrics_key_ddl=",\n  PRIMARY KEY (device_id, name, time_ns, attrs)",
    metrics_index_ddl="",
)

# Statements shared by both backends, written with `?` placeholders (PostgreSQL's backend
# turns them into `%s`). De-duplication is the unique key plus ON CONFLICT DO NOTHING: a
# skipped row reports rowcount 0 in both dialects, which is how duplicates are counted.
INSERT_LOG_SQL = (
    "INSERT INTO logs (device_id, boot_id, seq, time_ns, type, event_name, body, attrs, "
    "received_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
INSERT_OTA_STATE_SQL = (
    "INSERT INTO ota_states (device_id, boot_id, seq, time_ns, package, version, "
    "from_version, state, reason, channel) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
INSERT_METRIC_SQL = (
    "INSERT INTO metrics (device_id, name, time_ns, value, attrs) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
INSERT_OTA_QUALITY_SQL = (
    "INSERT INTO ota_quality (device_id, boot_id, seq, name, value) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
TOUCH_DEVICE_SQL = (
    "INSERT INTO devices (device_id, first_seen_s, last_seen_s) VALUES (?, ?, ?) "
    "ON CONFLICT (device_id) DO UPDATE SET last_seen_s = excluded.last_seen_s"
)
TABLES = ("logs", "metrics", "ota_states", "ota_quality", "devices")


class StatementRunner(Protocol):
    """Runs statements inside one write transaction of a backend."""

    def run(self, sql: str, args: Sequence[Any]) -> int:
        """Execute one statement; the number of rows it changed."""

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Execute one statement per row (batched by the driver); rows changed in all."""


T = TypeVar("T")


class TelemetryStore(ABC):
    """What the request handlers and the rollout controller use; SQL shared by both backends.

    A backend supplies a write transaction, a read, and the name of the column that orders
    rows which arrived in the same nanosecond (SQLite's rowid, PostgreSQL's identity column).
    """

    where: str
    arrival_column: str

    @abstractmethod
    def close(self) -> None:
        """Release the connection(s)."""

    @abstractmethod
    def _write(self, what: str, work: Callable[[StatementRunner], T]) -> T:
        """Run work in one transaction; a driver error becomes TelemetryError (rolled back)."""

    @abstractmethod
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read; a driver error becomes TelemetryError."""

    # --- ingest ---

    def insert_logs(self, rows: Sequence[LogRow], now_s: float | None = None) -> IngestResult:
        now_s = time.time() if now_s is None else now_s

        ordered = _in_key_order(rows)
        log_values = [
            (
                row.device_id,
                row.boot_id,
                row.seq,
                row.time_ns,
                row.type,
                row.event_name,
                row.body,
                json.dumps(row.attrs)[:MAX_ATTR_TEXT],
                now_s,
            )
            for row in ordered
        ]
        ota_values: list[tuple[Any, ...]] = []
        quality_values: list[tuple[Any, ...]] = []
        for row in ordered:
            state_values = _ota_state_values(row)
            if state_values is not None:
                ota_values.append(state_values)
                quality_values += _quality(row)

        def work(db: StatementRunner) -> int:
            # One batched statement per table (a round trip per row would dominate on
            # PostgreSQL). ota_states and ota_quality share the logs key, so a resent row is
            # skipped there too.
            accepted = db.run_many(INSERT_LOG_SQL, log_values)
            db.run_many(INSERT_OTA_STATE_SQL, ota_values)
            db.run_many(INSERT_OTA_QUALITY_SQL, quality_values)
            _touch_devices(db, (r.device_id for r in rows), now_s)
            return accepted

        accepted = self._write("logs", work)
        return IngestResult(accepted, len(rows) - accepted)

    def insert_metrics(self, rows: Sequence[MetricRow], now_s: float | None = None) -> IngestResult:
        now_s = time.time() if now_s is None else now_s

        keyed = sorted(
            (
                (row.device_id, row.name, row.time_ns, json.dumps(row.attrs, sort_keys=True)),
                row.value,
            )
            for row in rows
        )
        values = [(d, n, t, value, attrs[:MAX_ATTR_TEXT]) for (d, n, t, attrs), value in keyed]

        def work(db: StatementRunner) -> int:
            accepted = db.run_many(INSERT_METRIC_SQL, values)
            _touch_devices(db, (r.device_id for r in rows), now_s)
            return accepted

        accepted = self._write("metrics", work)
        return IngestResult(accepted, len(rows) - accepted)

    # --- what the rollout controller and the status page read ---

    def known_devices(self) -> list[str]:
        return [r[0] for r in self._query("SELECT device_id FROM devices ORDER BY device_id")]

    def latest_states(self, package: str, version: str) -> dict[str, str]:
        rows = self._query(
            "SELECT device_id, state FROM ota_states WHERE package = ? AND version = ? "
            f"AND state NOT IN {IDLE_STATES} ORDER BY time_ns, {self.arrival_column}",
            (package, version),
        )
        return {device: state for device, state in rows}

    def state_reports(self, package: str, version: str) -> list[tuple[str, str, float]]:
        """(device_id, state, received_s) of every install report for this version, in the
        device's order; received_s is this server's clock when the report arrived, which a
        device cannot set (its own timeUnixNano may come from a clock years off)."""
        # ota_states shares the logs key, so the join finds each report's one logs row.
        rows = self._query(
            "SELECT o.device_id, o.state, l.received_s FROM ota_states o JOIN logs l "
            "ON l.device_id = o.device_id AND l.boot_id = o.boot_id AND l.seq = o.seq "
            f"WHERE o.package = ? AND o.version = ? AND o.state NOT IN {IDLE_STATES} "
            f"ORDER BY o.time_ns, o.{self.arrival_column}",
            (package, version),
        )
        return [(str(device), str(state), float(received)) for device, state, received in rows]

    def quality_reports(self, package: str, versions: Sequence[str]) -> list[QualityRow]:
        """Every quality figure reported on an install event of these versions of
        ``package``, in the device's order, with the report's state, from_version and
        server receipt time."""
        if not versions:
            return []
        marks = ", ".join("?" for _ in versions)
        rows = self._query(
            "SELECT o.device_id, o.version, o.from_version, o.state, l.received_s, q.name, "
            "q.value FROM ota_quality q JOIN ota_states o ON o.device_id = q.device_id "
            "AND o.boot_id = q.boot_id AND o.seq = q.seq JOIN logs l ON l.device_id = "
            "o.device_id AND l.boot_id = o.boot_id AND l.seq = o.seq WHERE o.package = ? "
            f"AND o.version IN ({marks}) AND o.state NOT IN {IDLE_STATES} "
            f"ORDER BY o.time_ns, o.{self.arrival_column}",
            (package, *versions),
        )
        return [
            QualityRow(str(d), v or "", f or "", str(st), float(r), str(n), float(x))
            for d, v, f, st, r, n, x in rows
        ]

    def count_rows(self, table: str) -> int:
        if table not in TABLES:
            raise UsageError(f"unknown table {table!r}")
        return int(self._query(f"SELECT COUNT(*) FROM {table}")[0][0])

    def state_counts(self, package: str) -> dict[tuple[str, str], int]:
        """(version, state) -> devices whose newest event for that version is that state."""
        rows = self._query(
            "SELECT device_id, version, state FROM ota_states WHERE package = ? "
            f"AND state NOT IN {IDLE_STATES} ORDER BY time_ns, {self.arrival_column}",
            (package,),
        )
        latest: dict[tuple[str, str], str] = {}
        for device, version, state in rows:
            latest[(device, version or "?")] = state
        counts: dict[tuple[str, str], int] = {}
        for (_, version), state in latest.items():
            counts[(version, state)] = counts.get((version, state), 0) + 1
        return counts

    def version_timeline(
        self, package: str, points: int = 40, now_ns: int | None = None
    ) -> tuple[list[int], dict[str, list[int]]]:
        """Devices running each version at `points` evenly spaced times (for the status chart).

        A device runs `version` after COMMITTED and `from_version` after ROLLED_BACK.
        """
        rows = self._query(
            "SELECT device_id, time_ns, version, from_version, state FROM ota_states "
            "WHERE package = ? AND state IN ('COMMITTED', 'ROLLED_BACK') "
            f"ORDER BY time_ns, {self.arrival_column}",
            (package,),
        )
        if not rows:
            return [], {}
        start = rows[0][1]
        end = max(now_ns or rows[-1][1], rows[-1][1])
        step = max(1, (end - start) // max(1, points - 1))
        times = [start + i * step for i in range(points)]
        running: dict[str, str] = {}
        series: dict[str, list[int]] = {}
        index = 0
        for ti, t in enumerate(times):
            while index < len(rows) and rows[index][1] <= t:
                device, _, version, from_version, state = rows[index]
                now_version = version if state == "COMMITTED" else from_version
                if now_version:
                    running[device] = now_version
                else:
                    running.pop(device, None)
                index += 1
            counts: dict[str, int] = {}
            for v in running.values():
                counts[v] = counts.get(v, 0) + 1
            for v in counts:
                series.setdefault(v, [0] * len(times))
            for v, values in series.items():
                values[ti] = counts.get(v, 0)
        return times, series

    # --- what the fleet page reads (agent/fleet/page.py) ---

    def device_seen(self) -> dict[str, tuple[float, float]]:
        """device_id -> (first_seen_s, last_seen_s), server clock."""
        rows = self._query("SELECT device_id, first_seen_s, last_seen_s FROM devices")
        return {d: (float(first), float(last)) for d, first, last in rows}

    def latest_summaries(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """device_id -> (time_ns, attrs) of its newest inference summary."""
        rows = self._query(
            "SELECT l.device_id, l.time_ns, l.attrs FROM logs l JOIN (SELECT device_id, "
            "MAX(time_ns) AS newest FROM logs WHERE type = 'summary' GROUP BY device_id) m "
            "ON l.device_id = m.device_id AND l.time_ns = m.newest WHERE l.type = 'summary'"
        )
        return {d: (int(t), _attrs(a)) for d, t, a in rows}

    def ota_history(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """ota.state rows (one device's, or all), oldest first, IDLE and CHECKING included."""
        where, args = ("WHERE device_id = ? ", (device_id,)) if device_id is not None else ("", ())
        rows = self._query(
            "SELECT device_id, time_ns, package, version, from_version, state, reason, channel "
            f"FROM ota_states {where}ORDER BY time_ns, {self.arrival_column}",
            args,
        )
        keys = ("device_id", "time_ns", "package", "version", "from_version", "state")
        return [dict(zip((*keys, "reason", "channel"), row)) for row in rows]

    def device_records(
        self, device_id: str, type_: str, event_name: str, limit: int
    ) -> list[tuple[int, dict[str, Any]]]:
        """A device's newest `limit` log rows of one type and name as (time_ns, attrs),
        oldest first."""
        rows = self._query(
            "SELECT time_ns, attrs FROM logs WHERE device_id = ? AND type = ? AND "
            "event_name = ? ORDER BY time_ns DESC LIMIT ?",
            (device_id, type_, event_name, int(limit)),
        )
        return [(int(t), _attrs(a)) for t, a in reversed(rows)]


def _attrs(text: Any) -> dict[str, Any]:
    # attrs are cut at MAX_ATTR_TEXT when stored; a cut row reads as empty, not as an error.
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _in_key_order(rows: Sequence[LogRow]) -> list[LogRow]:
    # Every writer takes its row locks in key order, so two overlapping batches (a device's
    # retry racing its first try) wait for each other instead of deadlocking on PostgreSQL.
    # Within one boot this is also the device's own order (seq).
    return sorted(rows, key=lambda r: (r.device_id, r.boot_id, r.seq))


def _ota_state_values(row: LogRow) -> tuple[Any, ...] | None:
    if row.event_name != "ota.state":
        return None

    def attr(key: str) -> str | None:
        value = row.attrs.get(f"edge_agent.attr.{key}")
        return None if value is None else str(value)

    state = attr("state")
    if state is None:
        return None
    return (
        row.device_id,
        row.boot_id,
        row.seq,
        row.time_ns,
        attr("package"),
        attr("version"),
        attr("from_version"),
        state.upper(),
        attr("reason"),
        attr("channel"),
    )


def _quality(row: LogRow) -> list[tuple[Any, ...]]:
    """(device, boot, seq, name, value) of the event's quality figures that are finite numbers
    under a well-formed name; anything else a device sends there is not a figure (a liar or
    a bug must not turn into NaN, a string or a 400-digit integer in the controller's sums)."""
    figures: dict[str, float] = {}
    for key, raw in row.attrs.items():
        if not key.startswith(QUALITY_PREFIX) or isinstance(raw, bool):
            continue
        name = key[len(QUALITY_PREFIX) :]
        if not isinstance(raw, (int, float)) or not QUALITY_NAME_RE.fullmatch(name):
            continue
        try:
            value = float(raw)
        except OverflowError:  # an intValue past a double's range
            continue
        if math.isfinite(value):
            figures[name] = value
    names = sorted(figures)[:MAX_QUALITY_FIGURES]
    return [(row.device_id, row.boot_id, row.seq, n, figures[n]) for n in names]


def _touch_devices(db: StatementRunner, device_ids: Iterable[str], now_s: float) -> None:
    # Sorted, so two transactions touching the same devices lock them in the same order.
    db.run_many(TOUCH_DEVICE_SQL, [(d, now_s, now_s) for d in sorted(set(device_ids))])


def __getattr__(name: str) -> Any:
    # The old import paths of the factory and the SQLite backend keep working
    # (`from agent.fleet.store import open_store`, docs/CONTRACTS.md), resolved on first use
    # so that this base module never imports a subclass while it loads.
    if name in ("open_store", "is_database_url"):
        from agent.fleet import open_store as factory

        return getattr(factory, name)
    if name == "SQLiteTelemetryStore":
        from agent.fleet import store_sqlite

        return store_sqlite.SQLiteTelemetryStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
