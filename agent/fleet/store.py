"""Server telemetry: OTLP/JSON parsing and rows de-duplicated by (device, boot, seq) in SQL."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.errors import InputDataError, TelemetryError, UsageError
from agent.sqlitedb import open_db

MAX_RECORDS_PER_REQUEST = 10_000
# Idle and checking say nothing about an install, so they never hide a device's outcome.
IDLE_STATES = "('IDLE', 'CHECKING')"
MAX_ATTR_TEXT = 64 << 10
# Both backends store these as signed 64-bit integers; bigger values are a bad payload (400),
# not a storage failure the device would retry forever.
INT64_MAX = (1 << 63) - 1
# kvlistValue / arrayValue nesting accepted in one attribute value (parsed recursively).
MAX_VALUE_DEPTH = 16
# ota.state events carry model-quality figures as `quality.<name>` attributes (CONTRACTS.md);
# the store keeps finite numbers under short lower-case names, at most this many per event,
# so one device cannot fill the table with made-up figures.
QUALITY_PREFIX = "edge_agent.attr.quality."
QUALITY_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
MAX_QUALITY_FIGURES = 32


class BadPayloadError(InputDataError):
    """An OTLP request body does not follow the OTLP/JSON shape or our attribute contract."""


@dataclass(frozen=True)
class LogRow:
    device_id: str
    boot_id: str
    seq: int
    time_ns: int
    type: str
    event_name: str
    body: str | None
    attrs: dict[str, Any]


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


@dataclass(frozen=True)
class MetricRow:
    device_id: str
    name: str
    time_ns: int
    value: float | None
    attrs: dict[str, Any]


# ---------------------------------------------------------------------------------------
# OTLP/JSON parsing (pure)
# ---------------------------------------------------------------------------------------


def _any_value(value: Any, where: str, depth: int = 0) -> Any:
    if not isinstance(value, dict):
        raise BadPayloadError(f"{where}: AnyValue must be an object")
    if depth > MAX_VALUE_DEPTH:
        # Our devices send flat attributes; a deep tree is an attack on the recursion below.
        raise BadPayloadError(f"{where}: values nested deeper than {MAX_VALUE_DEPTH} levels")
    if "stringValue" in value:
        return _text(value["stringValue"], where)
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        try:
            return int(value["intValue"])  # OTLP/JSON sends 64-bit ints as strings
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e999)
            raise BadPayloadError(f"{where}: intValue is not an integer") from None
    if "doubleValue" in value:
        try:
            return float(value["doubleValue"])
        except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
            raise BadPayloadError(f"{where}: doubleValue is not a number") from None
    if "arrayValue" in value:
        items = _object(value["arrayValue"], f"{where}.arrayValue").get("values", [])
        return [_any_value(v, where, depth + 1) for v in _list(items, where)]
    if "kvlistValue" in value:
        items = _object(value["kvlistValue"], f"{where}.kvlistValue").get("values", [])
        return _attributes(items, where, depth + 1)
    if "bytesValue" in value:
        return _text(value["bytesValue"], where)
    return None


def _text(value: Any, where: str) -> str:
    text = str(value)
    # PostgreSQL TEXT cannot hold NUL; refusing it here keeps both backends alike.
    if "\x00" in text:
        raise BadPayloadError(f"{where}: string contains a NUL character")
    return text


def _int64(value: int, where: str) -> int:
    if not 0 <= value <= INT64_MAX:
        raise BadPayloadError(f"{where}: {value} is outside 0..2^63-1")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    """An optional JSON object (absent or null reads as empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadPayloadError(f"{where}: expected an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadPayloadError(f"{where}: expected a list")
    return value


def _attributes(items: Any, where: str, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in _list(items, where):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise BadPayloadError(f"{where}: attribute without a string key")
        out[item["key"]] = _any_value(item.get("value", {}), f"{where}.{item['key']}", depth)
    return out


def _time_ns(record: Mapping[str, Any], where: str) -> int:
    raw = record.get("timeUnixNano") or record.get("observedTimeUnixNano") or 0
    try:
        time_ns = int(raw)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e999)
        raise BadPayloadError(f"{where}: timeUnixNano is not an integer") from None
    return _int64(time_ns, f"{where}.timeUnixNano")


def _device_of(resource_attrs: Mapping[str, Any], record_attrs: Mapping[str, Any]) -> Any:
    return record_attrs.get("edge_agent.device_id", resource_attrs.get("edge_agent.device_id"))


def parse_otlp_logs(payload: Any) -> list[LogRow]:
    """Rows from an ExportLogsServiceRequest in OTLP/JSON; every record needs our three ids."""
    if not isinstance(payload, dict):
        raise BadPayloadError("body: expected a JSON object")
    rows: list[LogRow] = []
    for i, rl in enumerate(_list(payload.get("resourceLogs"), "resourceLogs")):
        where_r = f"resourceLogs[{i}]"
        if not isinstance(rl, dict):
            raise BadPayloadError(f"{where_r}: expected an object")
        resource = _object(rl.get("resource"), f"{where_r}.resource")
        resource_attrs = _attributes(resource.get("attributes"), where_r)
        for j, sl in enumerate(_list(rl.get("scopeLogs"), f"{where_r}.scopeLogs")):
            if not isinstance(sl, dict):
                raise BadPayloadError(f"{where_r}.scopeLogs[{j}]: expected an object")
            records = _list(sl.get("logRecords"), f"{where_r}.scopeLogs[{j}].logRecords")
            for k, rec in enumerate(records):
                where = f"{where_r}.scopeLogs[{j}].logRecords[{k}]"
                if not isinstance(rec, dict):
                    raise BadPayloadError(f"{where}: expected an object")
                attrs = _attributes(rec.get("attributes"), where)
                device_id = _device_of(resource_attrs, attrs)
                boot_id = attrs.get("edge_agent.boot_id")
                seq = attrs.get("edge_agent.seq")
                if not isinstance(device_id, str) or not device_id:
                    raise BadPayloadError(f"{where}: edge_agent.device_id is missing")
                if not isinstance(boot_id, str) or not boot_id:
                    raise BadPayloadError(f"{where}: edge_agent.boot_id is missing")
                if not isinstance(seq, int) or isinstance(seq, bool):
                    raise BadPayloadError(f"{where}: edge_agent.seq must be an integer")
                body = rec.get("body")
                body_value = _any_value(body, f"{where}.body") if body else None
                rows.append(
                    LogRow(
                        device_id=device_id,
                        boot_id=boot_id,
                        seq=_int64(seq, f"{where}.edge_agent.seq"),
                        time_ns=_time_ns(rec, where),
                        type=str(attrs.get("edge_agent.type", "event")),
                        event_name=str(attrs.get("event.name", "")),
                        body=None if body_value is None else json.dumps(body_value)[:MAX_ATTR_TEXT],
                        attrs=attrs,
                    )
                )
                if len(rows) > MAX_RECORDS_PER_REQUEST:
                    raise BadPayloadError(f"body: more than {MAX_RECORDS_PER_REQUEST} records")
    return rows


def parse_otlp_metrics(payload: Any) -> list[MetricRow]:
    """Gauge and sum points (histograms as their sum) from an ExportMetricsServiceRequest."""
    if not isinstance(payload, dict):
        raise BadPayloadError("body: expected a JSON object")
    rows: list[MetricRow] = []
    for i, rm in enumerate(_list(payload.get("resourceMetrics"), "resourceMetrics")):
        where_r = f"resourceMetrics[{i}]"
        if not isinstance(rm, dict):
            raise BadPayloadError(f"{where_r}: expected an object")
        resource = _object(rm.get("resource"), f"{where_r}.resource")
        resource_attrs = _attributes(resource.get("attributes"), where_r)
        for j, sm in enumerate(_list(rm.get("scopeMetrics"), f"{where_r}.scopeMetrics")):
            if not isinstance(sm, dict):
                raise BadPayloadError(f"{where_r}.scopeMetrics[{j}]: expected an object")
            for k, metric in enumerate(_list(sm.get("metrics"), f"{where_r}.metrics")):
                where = f"{where_r}.scopeMetrics[{j}].metrics[{k}]"
                if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
                    raise BadPayloadError(f"{where}: metric without a name")
                _text(metric["name"], f"{where}.name")
                for kind in ("gauge", "sum", "histogram", "summary"):
                    if kind in metric:
                        data = metric[kind]
                        break
                else:
                    raise BadPayloadError(f"{where}: no gauge, sum or histogram data")
                if not isinstance(data, dict):
                    raise BadPayloadError(f"{where}.{kind}: expected an object")
                for n, point in enumerate(_list(data.get("dataPoints"), f"{where}.dataPoints")):
                    pw = f"{where}.dataPoints[{n}]"
                    if not isinstance(point, dict):
                        raise BadPayloadError(f"{pw}: expected an object")
                    attrs = _attributes(point.get("attributes"), pw)
                    device_id = _device_of(resource_attrs, attrs)
                    if not isinstance(device_id, str) or not device_id:
                        raise BadPayloadError(f"{pw}: edge_agent.device_id is missing")
                    raw = point.get("asDouble", point.get("asInt", point.get("sum")))
                    try:
                        value = None if raw is None else float(raw)
                    except (TypeError, ValueError, OverflowError):
                        raise BadPayloadError(f"{pw}: value is not a number") from None
                    rows.append(
                        MetricRow(device_id, metric["name"], _time_ns(point, pw), value, attrs)
                    )
                    if len(rows) > MAX_RECORDS_PER_REQUEST:
                        raise BadPayloadError(f"body: more than {MAX_RECORDS_PER_REQUEST} points")
    return rows


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


def open_store(url: str) -> TelemetryStore:
    """A store from a SQLite path (or sqlite:/// URL) or a postgresql:// URL."""
    if url.startswith(("postgres://", "postgresql://")):
        try:
            from agent.fleet.store_pg import PostgresTelemetryStore
        except ImportError:
            raise UsageError(
                "PostgreSQL storage needs psycopg: pip install 'edge-agent[server]'"
            ) from None
        return PostgresTelemetryStore(url)
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else url
    return SQLiteTelemetryStore(Path(path))


def is_database_url(value: str) -> bool:
    """True for a PostgreSQL URL (never a file path to check for existence)."""
    return value.startswith(("postgres://", "postgresql://"))


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
                self._db.execute("BEGIN IMMEDIATE")
                result = work(_SQLiteRunner(self._db))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise TelemetryError(f"{self.where}: cannot store {what} ({exc})") from None
        return result

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args))
            except sqlite3.Error as exc:
                raise TelemetryError(f"{self.where}: query failed ({exc})") from None
