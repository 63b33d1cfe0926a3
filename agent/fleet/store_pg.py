"""The fleet telemetry store on PostgreSQL (psycopg 3), for fleets past one machine."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from agent.errors import TelemetryError, UsageError
from agent.fleet.store import SCHEMA_TEMPLATE, StatementRunner, T, TelemetryStore

Connection = psycopg.Connection[tuple[Any, ...]]

# The differences from SQLite, all of them: 64-bit integer and float type names, an
# identity column standing in for rowid (arrival order), and the metrics key. A btree key
# over the whole attrs text would break PostgreSQL's ~2.7 kB index row limit, so the
# unique index takes md5(attrs) instead; ON CONFLICT DO NOTHING (no target) honours it.
SCHEMA_PG = SCHEMA_TEMPLATE.format(
    int64="BIGINT",
    float64="DOUBLE PRECISION",
    arrival_column_ddl="\n  arrival BIGINT GENERATED ALWAYS AS IDENTITY,",
    metrics_key_ddl="",
    metrics_index_ddl=(
        "\nCREATE UNIQUE INDEX IF NOT EXISTS metrics_once "
        "ON metrics (device_id, name, time_ns, md5(attrs));"
    ),
)
# Two servers starting at once would race on CREATE TABLE IF NOT EXISTS (a unique
# violation in the catalog); one transaction-scoped advisory lock orders them.
SCHEMA_LOCK_KEY = 0x6564676541  # "edgeA"
PASSWORD_IN_URL_RE = re.compile(r"://([^:@/]*):[^@/]*@")


def display_url(params: dict[str, Any]) -> str:
    """The URL as it may appear in logs and errors: no password."""
    user = f"{params['user']}@" if params.get("user") else ""
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _placeholders(sql: str) -> str:
    # The shared statements use SQLite's `?`; none contains a literal `?` or `%`.
    return sql.replace("?", "%s")


class _PostgresRunner:
    def __init__(self, conn: Connection) -> None:
        self.cursor = conn.cursor()

    def run(self, sql: str, args: Sequence[Any]) -> int:
        self.cursor.execute(_placeholders(sql), args)
        return self.cursor.rowcount

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        # psycopg pipelines executemany (one round trip) and sums the rowcounts.
        self.cursor.executemany(_placeholders(sql), rows)
        return self.cursor.rowcount


class PostgresTelemetryStore(TelemetryStore):
    """The same store on PostgreSQL: a small pool of connections, one per concurrent request.

    A pooled connection that the server dropped (restart, failover, idle timeout) is
    replaced and the work retried once; a retried write is safe because rows de-duplicate.
    """

    arrival_column = "arrival"

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 8,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 30.0,
    ) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            shown = PASSWORD_IN_URL_RE.sub(r"://\1:***@", url)
            raise UsageError(f"{shown}: not a valid PostgreSQL URL ({_one_line(exc)})") from None
        self.where = display_url(params)
        self._url = url
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._closed = False
        self._write("schema", self._create_schema)

    @staticmethod
    def _create_schema(db: StatementRunner) -> None:
        db.run("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))
        for statement in SCHEMA_PG.split(";"):
            if statement.strip():
                db.run(statement, ())

    def _connect(self) -> Connection:
        try:
            conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s))
            )
            # SET takes no bind parameters; the value is our own integer.
            conn.execute(f"SET statement_timeout = {int(self.statement_timeout_s * 1000)}")
        except psycopg.Error as exc:
            raise TelemetryError(f"{self.where}: cannot connect ({_one_line(exc)})") from None
        return conn

    @contextmanager
    def _connection(self) -> Iterator[tuple[Connection, bool]]:
        """A connection and whether it was reused from the pool (may be stale)."""
        if not self._slots.acquire(timeout=self.connect_timeout_s):
            raise TelemetryError(f"{self.where}: all {self.max_connections} connections busy")
        try:
            with self._lock:
                if self._closed:
                    raise TelemetryError(f"{self.where}: store is closed")
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            try:
                yield conn, reused
            finally:
                with self._lock:
                    keep = not (conn.closed or conn.broken or self._closed)
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()
        finally:
            self._slots.release()

    def _run(self, what: str, work: Callable[[Connection], T]) -> T:
        for attempt in (1, 2):
            with self._connection() as (conn, reused):
                try:
                    return work(conn)
                except psycopg.Error as exc:
                    if reused and conn.broken and attempt == 1:
                        continue  # a pooled connection went stale: retry on a fresh one
                    raise TelemetryError(f"{self.where}: {what} ({_one_line(exc)})") from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def _write(self, what: str, work: Callable[[StatementRunner], T]) -> T:
        def in_transaction(conn: Connection) -> T:
            with conn.transaction():
                return work(_PostgresRunner(conn))

        return self._run(f"cannot store {what}", in_transaction)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def read(conn: Connection) -> list[tuple[Any, ...]]:
            return conn.execute(_placeholders(sql), args).fetchall()

        return self._run("query failed", read)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
