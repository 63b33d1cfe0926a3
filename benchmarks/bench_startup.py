"""Start-up cost and daemon memory: edge-agent commands and the daemon vs bare Python.

Three figures, each against a baseline measured side by side in the same run:

- ``cli_version_startup_ratio``: wall time of ``edge-agent --version`` / ``python -c pass``
  (median of interleaved pairs; target <= 3);
- ``cli_status_startup_ratio``: ``edge-agent status --state-dir DIR`` on a state dir a
  daemon just left / ``python -c pass`` (target <= 5);
- ``daemon_rss_ratio``: the daemon's RSS after ``--rss-seconds`` at a 20 FPS cap on the
  demo digits model / a bare Python process running the same model with onnxruntime at
  the same cap for the same time (target <= 1.25).

The last line is ``startup_worst_ratio=<max of the two CLI ratios>``. Wall times on a
shared machine are noisy: each CLI ratio is the median of per-pair ratios, and the spread
(min..max of the pairs) is printed beside it.

    .venv/bin/python benchmarks/bench_startup.py [--pairs 15] [--rss-seconds 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = REPO_ROOT / "agent" / "demo" / "models" / "digits_fp32.onnx"
FPS_CAP = 20.0

BARE_MODEL_LOOP = """
import os, sys, time
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in inp.shape]
x = np.random.default_rng(0).random(shape, dtype=np.float32)
period, end = 1.0 / float(sys.argv[2]), time.monotonic() + float(sys.argv[3])
deadline = time.monotonic()
while time.monotonic() < end:
    sess.run(None, {inp.name: x})
    deadline += period
    time.sleep(max(0.0, deadline - time.monotonic()))
print("ready", flush=True)
time.sleep(3600)
"""


def edge_agent() -> str:
    found = Path(sys.executable).parent / "edge-agent"
    if not found.exists():
        raise SystemExit(f"Error: {found}: not found (run bash tools/setup.sh first)")
    return str(found)


def wall_s(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    took = time.perf_counter() - started
    if done.returncode not in (0, 3):  # status exits 3 when the daemon is not running
        raise SystemExit(f"Error: {' '.join(argv)} exited {done.returncode}: {done.stderr!r}")
    return took


def pair_ratios(command: list[str], pairs: int) -> list[float]:
    """Per-pair ratios command / python -c pass, the two run back to back each pair."""
    bare = [sys.executable, "-c", "pass"]
    wall_s(command)  # page cache warm for both before the first pair
    wall_s(bare)
    ratios = []
    for i in range(pairs):
        # alternate which goes first, so a slow phase of the machine hits both sides
        if i % 2:
            a, b = wall_s(command), wall_s(bare)
        else:
            b, a = wall_s(bare), wall_s(command)
        ratios.append(a / b)
    return ratios


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"Error: /proc/{pid}/status has no VmRSS")


def write_config(work: Path) -> Path:
    state = work / "state"
    config = work / "agent.yaml"
    config.write_text(
        f"""state_dir: {state}
model:
  path: {MODEL}
  intra_op_threads: 1
  warmup_runs: 3
  labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
preprocess:
  resize: [8, 8]
  layout: NCHW
  color_order: GRAY
  scale: 0.00392156862745098
source:
  kind: synthetic
  pattern: digits
scheduler:
  fps_cap: {FPS_CAP}
governor:
  enabled: true
sinks: []
telemetry:
  enabled: false
status:
  interval_s: 1.0
"""
    )
    return config


def daemon_rss_kb(config: Path, seconds: float) -> int:
    proc = subprocess.Popen(
        [edge_agent(), "-q", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(seconds)
        if proc.poll() is not None:
            raise SystemExit(f"Error: the daemon exited early: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        return rss_kb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def bare_rss_kb(seconds: float) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_MODEL_LOOP, str(MODEL), str(FPS_CAP), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("Error: the bare onnxruntime loop did not start")
        return rss_kb(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def spread(ratios: list[float]) -> str:
    return f"median of {len(ratios)} pairs, pairs {min(ratios):.2f}..{max(ratios):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=15, help="interleaved pairs (default 15)")
    parser.add_argument(
        "--rss-seconds", type=float, default=30.0, help="seconds at the cap before RSS (30)"
    )
    args = parser.parse_args()
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    with tempfile.TemporaryDirectory(prefix="bench-startup.") as tmp:
        work = Path(tmp)
        config = write_config(work)
        daemon_kb = daemon_rss_kb(config, args.rss_seconds)
        bare_kb = bare_rss_kb(args.rss_seconds)
        rss_ratio = daemon_kb / bare_kb
        print(f"daemon RSS {daemon_kb / 1024:.1f} MB, bare onnxruntime {bare_kb / 1024:.1f} MB")
        version = pair_ratios([edge_agent(), "--version"], args.pairs)
        status = pair_ratios(
            [edge_agent(), "status", "--state-dir", str(work / "state")], args.pairs
        )
    version_ratio = statistics.median(version)
    status_ratio = statistics.median(status)
    print(f"cli_version_startup_ratio={version_ratio:.2f}  ({spread(version)}; target <= 3)")
    print(f"cli_status_startup_ratio={status_ratio:.2f}  ({spread(status)}; target <= 5)")
    print(f"daemon_rss_ratio={rss_ratio:.3f}  (target <= 1.25)")
    print(f"startup_worst_ratio={max(version_ratio, status_ratio):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
