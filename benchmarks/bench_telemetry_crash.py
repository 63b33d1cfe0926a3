"""Kill a telemetry writer with SIGKILL at random points >= 1000 times; count lost acked rows.

Each round forks a child that appends batches to telemetry.db and reports every committed
batch's last seq on a pipe; the parent kills it after a random delay, then checks
PRAGMA integrity_check and that every acknowledged row is present.
Rounds alternate between synchronous=NORMAL (the default) and FULL (the baseline that
also survives power loss), each with its own file, so the two are compared side by side.
Prints telemetry_lost_rows=<n> last (target 0).
"""

from __future__ import annotations

import argparse
import os
import random
import select
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.telemetry.store import NewRecord, TelemetryStore  # noqa: E402

BATCH_ROWS = 10


def child(db_path: Path, write_fd: int, synchronous: str) -> None:
    store = TelemetryStore(db_path, "dev", "boot", max_bytes=1 << 30, synchronous=synchronous)  # type: ignore[arg-type]
    while True:
        now = time.time_ns()
        records = [
            NewRecord("sample", 0, "bench", now, now, True, {"pad": "x" * 200})
            for _ in range(BATCH_ROWS)
        ]
        seqs = store.append(records)
        os.write(write_fd, f"{seqs[-1]}\n".encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--max-delay-ms", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    modes = ("NORMAL", "FULL")
    lost = dict.fromkeys(modes, 0)
    integrity_failures = dict.fromkeys(modes, 0)
    acked_total = dict.fromkeys(modes, 0)
    with tempfile.TemporaryDirectory() as tmp:
        acked: dict[str, list[int]] = {m: [] for m in modes}
        started = time.monotonic()
        for kill in range(args.kills):
            mode = modes[kill % 2]
            db_path = Path(tmp) / f"telemetry-{mode}.db"
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child never returns
                os.close(read_fd)
                try:
                    child(db_path, write_fd, mode)
                finally:
                    os._exit(1)
            os.close(write_fd)
            time.sleep(rng.uniform(0.0, args.max_delay_ms) / 1000.0)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            data = b""
            while select.select([read_fd], [], [], 0)[0]:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                data += chunk
            os.close(read_fd)
            # Only complete lines are acknowledgements; a torn last line was never sent.
            acked[mode] += [int(line) for line in data.decode().split("\n")[:-1] if line]
            if kill % 50 >= 48 or kill >= args.kills - 2:
                with sqlite3.connect(db_path) as conn:
                    if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                        integrity_failures[mode] += 1
                    present = {s for (s,) in conn.execute("SELECT seq FROM records")}
                for last in acked[mode]:
                    lost[mode] += sum(1 for k in range(BATCH_ROWS) if last - k not in present)
                acked_total[mode] += len(acked[mode]) * BATCH_ROWS
                acked[mode] = []
        elapsed = time.monotonic() - started
    print(f"kills={args.kills} elapsed_s={elapsed:.1f}")
    for mode in modes:
        print(
            f"synchronous={mode} acknowledged_rows={acked_total[mode]}"
            f" integrity_failures={integrity_failures[mode]} lost_rows={lost[mode]}"
        )
    print(f"telemetry_lost_rows={sum(lost.values()) + sum(integrity_failures.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
