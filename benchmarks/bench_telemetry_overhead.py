"""Frame-loop P99 with telemetry on vs off, interleaved in blocks in one process.

Each frame runs the model (ONNX Runtime, 1 thread) and, in "on" blocks, feeds the
TelemetryRecorder (observe_inference every frame, set_gauges and an event every 100
frames) with its writer thread storing samples and summaries and its upload thread
sending them to a local OTLP receiver. The timed span is the whole frame: inference plus
the telemetry calls. Prints telemetry_p99_ratio=<on/off> last (target <= 1.05).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from agent.config import TelemetryConfig  # noqa: E402
from agent.runtime import BackendOptions, load_backend  # noqa: E402
from agent.telemetry.recorder import TelemetryRecorder  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "telemetry_receiver", REPO_ROOT / "tests" / "telemetry" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
receiver_mod = importlib.util.module_from_spec(_spec)
sys.modules["telemetry_receiver"] = receiver_mod  # dataclasses look their module up here
_spec.loader.exec_module(receiver_mod)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "agent/demo/models/cnn_fp32.onnx"))
    parser.add_argument("--blocks", type=int, default=40, help="blocks per mode")
    parser.add_argument("--block-frames", type=int, default=100)
    parser.add_argument("--sample-rate", type=float, default=0.01)
    args = parser.parse_args()
    backend = load_backend(Path(args.model), "onnx", BackendOptions(intra_op_threads=1))
    x = np.random.default_rng(0).random(backend.zeros(batch=1).shape, dtype=np.float32)
    for _ in range(20):  # warm-up, not counted
        backend.run(x)
    receiver = receiver_mod.OtlpReceiver().start()
    times: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TelemetryConfig(
            sample_rate=args.sample_rate,
            summary_interval_s=1.0,
            upload_interval_s=1.0,
            endpoint=receiver.url,
        )
        recorder = TelemetryRecorder(cfg, "bench-dev", Path(tmp) / "telemetry.db")
        seq = 0
        perf = time.perf_counter
        for block in range(2 * args.blocks):
            mode = ("on", "off")[block % 2] if (block // 2) % 2 == 0 else ("off", "on")[block % 2]
            out = times[mode]
            for i in range(args.block_frames):
                start = perf()
                logits = backend.run(x)[0]
                if mode == "on":
                    top = int(logits[0].argmax())
                    recorder.observe_inference(
                        seq, perf() - start, top, float(logits[0, top]), {"source": "bench"}
                    )
                    if i % 100 == 0:
                        recorder.set_gauges({"cpu": 50.0}, "normal", 15.0)
                        recorder.event("governor.step", {"state": "normal", "fps_cap": 15.0})
                out.append(perf() - start)
                seq += 1
        recorder.close()
    receiver.stop()
    p99 = {m: float(np.percentile(np.asarray(t) * 1000, 99)) for m, t in times.items()}
    p50 = {m: float(np.percentile(np.asarray(t) * 1000, 50)) for m, t in times.items()}
    print(f"model={Path(args.model).name} frames_per_mode={len(times['on'])}")
    print(f"p50_ms on={p50['on']:.3f} off={p50['off']:.3f}")
    print(f"p99_ms on={p99['on']:.3f} off={p99['off']:.3f}")
    print(f"received_log_records={len(receiver.received.records)}")
    print(f"telemetry_p99_ratio={p99['on'] / p99['off']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
