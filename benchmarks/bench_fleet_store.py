"""Fleet telemetry store: PostgreSQL against the SQLite baseline, interleaved in one run.

Each round, for each backend in turn (order alternates): NUM_THREADS request threads each
store BATCHES batches of BATCH_ROWS ota.state log rows from their own devices (as the
server's request threads do), then every batch is sent again (all duplicates, the retry
path), then the rollout controller counts the release and the status page reads the
versions chart. PostgreSQL runs on a throwaway local cluster with crash-safe settings
comparable to SQLite WAL + synchronous=NORMAL (fsync on, synchronous_commit off).

Prints rows/s (new and duplicate) and count/chart query times per backend, and
fleet_store_pg_vs_sqlite_ingest=<PostgreSQL new-row rate / SQLite new-row rate> last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests" / "fleet"))

from pg_testlib import DURABLE_SETTINGS, running_postgres, why_no_postgres  # noqa: E402

from agent.fleet.store import LogRow, TelemetryStore, open_store  # noqa: E402

STATES = ("DOWNLOADING", "VERIFYING", "GATING", "ACTIVATING", "PROBATION", "COMMITTED")


def make_batches(round_no: int, threads: int, batches: int, rows: int) -> list[list[list[LogRow]]]:
    """Per thread, per batch: rows of ota.state events from that thread's own devices."""
    out: list[list[list[LogRow]]] = []
    for t in range(threads):
        per_thread = []
        for b in range(batches):
            batch = []
            for r in range(rows):
                device = f"dev-{t:02d}-{(b * rows + r) % 50:03d}"
                seq = round_no * 1_000_000 + b * rows + r
                attrs = {
                    "edge_agent.attr.state": STATES[seq % len(STATES)],
                    "edge_agent.attr.package": "digits",
                    "edge_agent.attr.version": "1.1.0",
                    "edge_agent.attr.from_version": "1.0.0",
                }
                batch.append(LogRow(device, "boot", seq, seq, "event", "ota.state", None, attrs))
            per_thread.append(batch)
        out.append(per_thread)
    return out


def timed_threads(work: Callable[[int], int], threads: int) -> tuple[float, int]:
    """Seconds for all threads to finish work(thread_index), and the sum of what they return."""
    results = [0] * threads
    runners = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, work(i))) for i in range(threads)
    ]
    start = time.perf_counter()
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    return time.perf_counter() - start, sum(results)


def one_round(
    store: TelemetryStore, batches: list[list[list[LogRow]]], stats: dict[str, list[float]]
) -> None:
    threads = len(batches)
    rows_total = sum(len(b) for per in batches for b in per)

    def ingest(i: int) -> int:
        return sum(store.insert_logs(b).accepted for b in batches[i])

    seconds, accepted = timed_threads(ingest, threads)
    assert accepted == rows_total, (accepted, rows_total)
    stats["new_rows_per_s"].append(rows_total / seconds)
    seconds, accepted = timed_threads(ingest, threads)
    assert accepted == 0
    stats["duplicate_rows_per_s"].append(rows_total / seconds)
    start = time.perf_counter()
    states = store.latest_states("digits", "1.1.0")
    stats["count_ms"].append((time.perf_counter() - start) * 1000)
    assert states
    start = time.perf_counter()
    store.version_timeline("digits", 40)
    stats["chart_ms"].append((time.perf_counter() - start) * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-rows", type=int, default=100)
    args = parser.parse_args()
    reason = why_no_postgres()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    with tempfile.TemporaryDirectory() as tmp, running_postgres(DURABLE_SETTINGS) as pg:
        stores = {
            "sqlite": open_store(str(Path(tmp) / "fleet.db")),
            "postgresql": open_store(pg.create_database("bench")),
        }
        stats: dict[str, dict[str, list[float]]] = {
            name: {
                k: [] for k in ("new_rows_per_s", "duplicate_rows_per_s", "count_ms", "chart_ms")
            }
            for name in stores
        }
        try:
            for round_no in range(args.rounds):
                batches = make_batches(round_no, args.threads, args.batches, args.batch_rows)
                order = list(stores) if round_no % 2 == 0 else list(reversed(stores))
                for name in order:
                    one_round(stores[name], batches, stats[name])
            rows_stored = {name: s.count_rows("ota_states") for name, s in stores.items()}
        finally:
            for s in stores.values():
                s.close()
    assert rows_stored["sqlite"] == rows_stored["postgresql"], rows_stored
    rows = args.threads * args.batches * args.batch_rows
    print(
        f"{args.rounds} rounds x {args.threads} threads x {args.batches} batches x "
        f"{args.batch_rows} rows ({rows} rows per round; {rows_stored['sqlite']} stored)"
    )
    for name, s in stats.items():
        print(
            f"{name:10s} new {statistics.median(s['new_rows_per_s']):8.0f} rows/s  "
            f"duplicate {statistics.median(s['duplicate_rows_per_s']):8.0f} rows/s  "
            f"count {statistics.median(s['count_ms']):6.1f} ms  "
            f"chart {statistics.median(s['chart_ms']):6.1f} ms (medians)"
        )
    ratio = statistics.median(stats["postgresql"]["new_rows_per_s"]) / statistics.median(
        stats["sqlite"]["new_rows_per_s"]
    )
    print(f"fleet_store_pg_vs_sqlite_ingest={ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
