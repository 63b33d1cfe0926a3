"""CLI commands that run models directly: infer and bench-model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from agent.commands import SubParsers, add_command
from agent.errors import InputDataError
from agent.progress import Progress
from agent.runtime import BACKEND_NAMES, Backend, BackendOptions, load_backend
from agent.runtime.bench import bench_models, current_rss_bytes
from agent.textio import format_table, load_npy, save_npy


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=BACKEND_NAMES, default="auto", help="runtime to use (default: auto)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, metavar="N", help="intra-op threads (default: 1)"
    )
    parser.add_argument(
        "--provider",
        action="append",
        metavar="NAME",
        help="ONNX Runtime execution provider (tensorrt, cuda, cpu); repeat for a preference "
        "order (default: auto)",
    )


def backend_options(args: argparse.Namespace) -> BackendOptions:
    return BackendOptions(
        intra_op_threads=max(1, args.threads),
        providers=tuple(args.provider) if args.provider else ("auto",),
    )


def cmd_infer(args: argparse.Namespace) -> int:
    x = load_npy(Path(args.input))
    if x.ndim == 0:
        raise InputDataError(f"{args.input}: expected an array of rows, got a scalar")
    backend = load_backend(Path(args.model), args.backend, backend_options(args))
    try:
        y = backend.predict(x)
    finally:
        backend.close()
    save_npy(Path(args.output), y.astype(np.float32))
    print(f"wrote {args.output}: {y.shape[0]} rows, output shape {tuple(y.shape)} float32")
    return 0


def _bench_input(backend: Backend) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = backend.zeros(batch=1)
    return rng.standard_normal(x.shape).astype(np.float32)


def cmd_bench_model(args: argparse.Namespace) -> int:
    models: list[tuple[str, Backend, int]] = []
    opts = backend_options(args)
    try:
        for path in args.model:
            before = current_rss_bytes()
            models.append((path, load_backend(Path(path), args.backend, opts), before))
        # The bar ends its line before the table prints (it used to stop short of 100 % and
        # leave the table's header glued to it).
        tty = sys.stderr.isatty() and not args.json
        with Progress("bench", 1.0, unit="%", enabled=None if tty else False, min_total=0) as bar:
            results = bench_models(
                models,
                _bench_input,
                seconds=args.seconds,
                warmup_runs=args.warmup,
                progress=bar.fraction,
            )
    finally:
        for _, b, _ in models:
            b.close()
    rows = [r.to_dict() for r in results]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["model", "backend", "provider", "runs", "p50 ms", "p95 ms", "p99 ms", "per s"]
    table = [
        [
            Path(r["model"]).name,
            r["backend"],
            r["provider"],
            r["runs"],
            f"{r['p50_ms']:.3f}",
            f"{r['p95_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['throughput_per_s']:.1f}",
        ]
        for r in rows
    ]
    headers.append("RSS added MB")
    for row, r in zip(table, rows):
        row.append(f"{r['rss_added_mb']:.1f}")
    print(format_table(headers, table))
    print("(one input per run, models interleaved; warm-up excluded)")
    return 0


def add_commands(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "infer",
        cmd_infer,
        "Run every row of an .npy file through a model and save the first output.",
        "edge-agent infer --model models/digits_int8.tflite --input x.npy --output y.npy",
    )
    p.add_argument("--model", required=True, help="model file (.onnx, .tflite, .engine)")
    p.add_argument("--input", required=True, help="float32 .npy, rows in the model's float domain")
    p.add_argument("--output", required=True, help="where to write the float32 .npy result")
    add_backend_args(p)

    p = add_command(
        sub,
        "bench-model",
        cmd_bench_model,
        "Measure latency percentiles, throughput and memory of one or more models on this device.",
        "edge-agent bench-model --model models/cnn_fp32.onnx --model models/cnn_int8.onnx",
    )
    p.add_argument(
        "--model", required=True, action="append", help="model file; repeat to compare side by side"
    )
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time (default: 5)")
    p.add_argument("--warmup", type=int, default=10, help="uncounted warm-up runs (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_backend_args(p)
