"""Drain one-hour telemetry backlogs to a local OTLP receiver that fails at random (>= 1000
faults), interleaved with the same drain to a clean receiver (the baseline).

Faults: 503 with Retry-After, 429, 500, 502, 504, connection reset before and after the
server processed the batch, answers slower than the read timeout, garbage 2xx bodies.
The receiver validates every payload with the opentelemetry-proto types and de-duplicates
on (device_id, boot_id, seq). Prints duplicates seen before de-duplication, gaps and
extras after it, the drain rate as a multiple of real time for both receivers, and
telemetry_upload_dup_gap=<gaps + extras> last (target 0; drain >= 20x).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.config import TelemetryConfig  # noqa: E402
from agent.telemetry.store import NewRecord, TelemetryStore  # noqa: E402
from agent.telemetry.uploader import OtlpHttpExporter, drain  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "telemetry_receiver", REPO_ROOT / "tests" / "telemetry" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
receiver_mod = importlib.util.module_from_spec(_spec)
sys.modules["telemetry_receiver"] = receiver_mod  # dataclasses look their module up here
_spec.loader.exec_module(receiver_mod)

HOUR_S = 3600
FPS = 15.0
SAMPLE_RATE = 0.01
SUMMARY_INTERVAL_S = 60.0

FAULTS: list[Any] = [
    ("status", 503, "0"),
    ("status", 429, None),
    ("status", 500, None),
    ("status", 502, None),
    ("status", 504, None),
    "reset_before",
    "reset_after",
    ("delay", 0.3),
    "garbage",
]


def one_hour_backlog(store: TelemetryStore, rng: random.Random) -> list[int]:
    """The rows one hour at 15 FPS makes: 1% samples, a summary a minute, an event a minute."""
    now = time.time_ns() - HOUR_S * 1_000_000_000
    records: list[NewRecord] = []
    frames = int(HOUR_S * FPS)
    for frame in range(frames):
        t = now + int(frame / FPS * 1e9)
        if rng.random() < SAMPLE_RATE:
            attrs = {
                "frame_seq": frame,
                "latency_ms": round(rng.uniform(2, 6), 3),
                "top_class": rng.randrange(10),
                "confidence": round(rng.random(), 4),
                "meta": {"source": "camera0", "width": 640, "height": 480},
            }
            records.append(NewRecord("sample", 0, "inference.sample", t, t, True, attrs))
        if frame % int(SUMMARY_INTERVAL_S * FPS) == 0:
            summary = {
                "start_unix_ns": t - 60_000_000_000,
                "frames": 900,
                "fps": 15.0,
                "latency_p50_ms": 3.1,
                "latency_p95_ms": 4.2,
                "latency_p99_ms": 5.9,
                "latency_sum_ms": 2900.0,
                "class_counts": {str(c): 90 for c in range(10)},
                "confidence_bounds": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                "confidence_counts": [0, 0, 10, 20, 70, 100, 200, 250, 150, 100],
                "temps_c": {"cpu-thermal": 58.0, "gpu-thermal": 55.5},
                "governor_state": "normal",
                "fps_cap": 15.0,
                "telemetry_counters": {},
            }
            records.append(NewRecord("summary", 1, "inference.summary", t, t, True, summary))
            event = {"state": "normal", "fps_cap": 15.0, "reason": "ok", "temp_c": 58.0}
            records.append(NewRecord("event", 3, "governor.step", t, t, True, event))
    seqs: list[int] = []
    for start in range(0, len(records), 500):
        seqs += store.append(records[start : start + 500])
    return seqs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-faults", type=int, default=1000)
    parser.add_argument("--fault-rate", type=float, default=0.5)
    parser.add_argument("--batch-rows", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    plan_rng = random.Random(args.seed + 1)

    def faulty(path: str, index: int) -> Any:
        return plan_rng.choice(FAULTS) if plan_rng.random() < args.fault_rate else "ok"

    servers = {
        "clean": receiver_mod.OtlpReceiver().start(),
        "faulty": receiver_mod.OtlpReceiver(faulty).start(),
    }
    # Backoff scaled down from the defaults (1 s .. 300 s) so 1000 faults fit in a run.
    cfg = TelemetryConfig(
        batch_max_rows=args.batch_rows,
        backoff_initial_s=0.005,
        backoff_max_s=0.1,
        read_timeout_s=0.15,
        connect_timeout_s=1.0,
        request_deadline_s=2.0,
    )
    expected: dict[str, set[tuple[str, str, int]]] = {"clean": set(), "faulty": set()}
    drain_s = {"clean": 0.0, "faulty": 0.0}
    hours = {"clean": 0, "faulty": 0}
    retries = 0
    with tempfile.TemporaryDirectory() as tmp:
        round_no = 0
        while round_no < 400:
            faults = sum(1 for _, a in servers["faulty"].received.requests if a != "ok")
            if faults >= args.min_faults and round_no % 2 == 0:
                break
            name = ("clean", "faulty")[round_no % 2]
            boot = f"boot-{round_no}"
            store = TelemetryStore(Path(tmp) / f"{name}.db", "bench-dev", boot, max_bytes=1 << 30)
            seqs = one_hour_backlog(store, rng)
            expected[name] |= {("bench-dev", boot, s) for s in seqs}
            exporter = OtlpHttpExporter(
                servers[name].url,
                connect_timeout_s=cfg.connect_timeout_s,
                read_timeout_s=cfg.read_timeout_s,
                request_deadline_s=cfg.request_deadline_s,
            )
            started = time.monotonic()
            result = drain(store, exporter, cfg, rng=random.Random(round_no))
            drain_s[name] += time.monotonic() - started
            hours[name] += 1
            retries += result.retries
            assert result.empty and result.rejected_rows == 0, result
            exporter.close()
            store.close()
            round_no += 1
    for server in servers.values():
        server.stop()
    faulty = servers["faulty"].received
    faults = sum(1 for _, a in faulty.requests if a != "ok")
    keys = faulty.keys
    unique = set(keys)
    gaps = len(expected["faulty"] - unique)
    extras = len(unique - expected["faulty"])
    clean_gaps = len(expected["clean"] - servers["clean"].unique_keys())
    rate = {n: hours[n] * HOUR_S / drain_s[n] if drain_s[n] else 0.0 for n in drain_s}
    print(
        f"rows_per_hour={len(expected['clean']) // max(1, hours['clean'])}"
        f" hours_drained clean={hours['clean']} faulty={hours['faulty']}"
    )
    print(f"faults_injected={faults} requests={len(faulty.requests)} retries={retries}")
    print(f"duplicates_before_dedup={len(keys) - len(unique)} gaps={gaps} extras={extras}")
    print(f"clean_receiver_gaps={clean_gaps} proto_errors={len(faulty.errors)}")
    print(f"drain_x_realtime clean={rate['clean']:.0f} faulty={rate['faulty']:.0f}")
    print(f"telemetry_upload_dup_gap={gaps + extras + clean_gaps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
