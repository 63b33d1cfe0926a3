#!/usr/bin/env python3
"""Backend.run overhead: a bare InferenceSession.run loop vs our Backend.run, interleaved.

Both loops drive the same onnxruntime session on the same ready input, alternating in
blocks so machine noise hits both alike. The figure is bare time / our time (1.0 means no
overhead; the target is >= 0.97 on the CNN model).

  python benchmarks/bench_backends.py [--model PATH] [--rounds N] [--block N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from agent.demo import demo_model
from agent.runtime import load_backend
from agent.runtime.onnx import OnnxBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=demo_model("cnn_fp32.onnx"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20)
    args = parser.parse_args()

    backend = load_backend(args.model, "onnx")
    assert isinstance(backend, OnnxBackend)
    session = backend.session
    x = np.random.default_rng(0).uniform(0, 1, backend.zeros(1).shape).astype(np.float32)
    feed = {backend.inputs[0].name: x}
    names = [o.name for o in backend.outputs]
    backend.warmup(10)

    bare_s = ours_s = 0.0
    for r in range(args.rounds):
        order = ("bare", "ours") if r % 2 == 0 else ("ours", "bare")
        for which in order:
            t0 = time.perf_counter()
            if which == "bare":
                for _ in range(args.block):
                    session.run(names, feed)
                bare_s += time.perf_counter() - t0
            else:
                for _ in range(args.block):
                    backend.run(x)
                ours_s += time.perf_counter() - t0
    n = args.rounds * args.block
    print(f"model={args.model.name} runs_each={n}")
    print(f"bare_ms_per_run={bare_s / n * 1000:.4f}")
    print(f"backend_ms_per_run={ours_s / n * 1000:.4f}")
    print(f"backend_overhead_ratio={bare_s / ours_s:.4f}")


if __name__ == "__main__":
    main()
