#!/usr/bin/env python3
"""Detection gate: mAP against pycocotools on the same boxes, and run_gate's overhead.

1. ``detection_map_abs_err_vs_pycocotools``: both shapes detectors' golden-set outputs are
   decoded as the gate decodes them; the largest absolute difference between the gate's
   mAP@0.5, mAP@0.5:0.95 and per-class AP@0.5 and pycocotools' COCOeval on the same boxes
   (target <= 1e-4).
2. ``gate_detection_overhead_ratio``: run_gate() wall time over a plain pass that loads
   both models and runs every golden row through each, one input at a time; rounds in
   interleaved pairs (the order flips every pair), the median of the per-pair ratios
   (target <= 1.3).

  python benchmarks/bench_gate_detection.py [--baseline M] [--candidate M] [--golden DIR]
                                            [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path

import numpy as np

from agent.ota.gate_data import load_golden_set
from agent.ota.gate_detection import ImageBoxes, coco_detection_metrics
from agent.ota.golden import run_gate
from agent.pipeline.detection import decode_batch, detection_spec_from_mapping
from agent.runtime import load_backend

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "agent" / "demo" / "models"


def bare_pass(baseline: Path, candidate: Path, inputs: np.ndarray) -> float:
    t0 = time.perf_counter()
    a = load_backend(baseline)
    b = load_backend(candidate)
    for row in range(len(inputs)):
        x = inputs[row : row + 1]
        a.run(x)
        b.run(x)
    a.close()
    b.close()
    return time.perf_counter() - t0


def pycocotools_figures(
    gt: list[ImageBoxes], dets: list[ImageBoxes], names: tuple[str, ...]
) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for img_id, (g, d) in enumerate(zip(gt, dets), start=1):
        images.append({"id": img_id})
        for (x1, y1, x2, y2), cls in zip(np.asarray(g.boxes).tolist(), g.classes.tolist()):
            w, h = x2 - x1, y2 - y1
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        assert d.scores is not None
        for (x1, y1, x2, y2), cls, score in zip(
            np.asarray(d.boxes, dtype=float).tolist(),
            d.classes.tolist(),
            np.asarray(d.scores, dtype=float).tolist(),
        ):
            results.append(
                {
                    "image_id": img_id,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
        }
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {"map50_95": float(ev.stats[0]), "map50": float(ev.stats[1])}
    for k in range(len(names)):
        p = ev.eval["precision"][0, :, k, 0, -1]
        out[f"ap50_{k}"] = float(np.mean(p[p > -1]))
    return out


def map_error(models: list[Path], golden_dir: Path) -> float:
    golden = load_golden_set(golden_dir)
    assert golden.boxes is not None
    spec = detection_spec_from_mapping(golden.detection, "detection.yaml")
    worst = 0.0
    for model in models:
        backend = load_backend(model)
        outputs = np.concatenate(
            [backend.run(golden.inputs[i : i + 1])[0] for i in range(golden.rows)]
        )
        backend.close()
        found = decode_batch([outputs], spec, (64, 64))
        dets = [ImageBoxes(d.boxes, d.classes, d.scores) for d in found]
        ours = coco_detection_metrics(list(golden.boxes), dets, len(golden.class_names))
        ref = pycocotools_figures(list(golden.boxes), dets, golden.class_names)
        mine = {"map50": ours["map50"], "map50_95": ours["map50_95"]}
        mine.update({f"ap50_{k}": v for k, v in ours["per_class_ap50"].items()})
        err = max(abs(mine[k] - ref[k]) for k in ref)
        print(
            f"{model.name}: mAP@0.5 {ours['map50']:.6f} (pycocotools {ref['map50']:.6f}), "
            f"mAP@0.5:0.95 {ours['map50_95']:.6f} (pycocotools {ref['map50_95']:.6f}), "
            f"max abs error {err:.2e}"
        )
        worst = max(worst, err)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=MODELS / "shapes_det_fp32.onnx")
    parser.add_argument("--candidate", type=Path, default=MODELS / "shapes_det_int8.onnx")
    parser.add_argument("--golden", type=Path, default=ROOT / "golden_local" / "detection")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    err = map_error([args.baseline, args.candidate], args.golden)
    inputs = np.load(args.golden / "inputs.npy", allow_pickle=False)
    # One untimed round of each pays the one-off costs (imports, the ORT environment).
    bare_pass(args.baseline, args.candidate, inputs)
    report = run_gate(args.baseline, args.candidate, args.golden)
    ratios: list[float] = []
    bare_s: list[float] = []
    gate_s: list[float] = []
    confirmed = 0  # gates whose failing first latency pass was timed again (a busy machine)
    for r in range(max(1, args.rounds)):
        pair: dict[str, float] = {}
        for which in ("bare", "gate") if r % 2 == 0 else ("gate", "bare"):
            t0 = time.perf_counter()
            if which == "bare":
                bare_pass(args.baseline, args.candidate, inputs)
            else:
                report = run_gate(args.baseline, args.candidate, args.golden)
                confirmed += report.metrics["latency"]["runs_per_row"] > 1
            pair[which] = time.perf_counter() - t0
        bare_s.append(pair["bare"])
        gate_s.append(pair["gate"])
        ratios.append(pair["gate"] / pair["bare"])
    verdict = "pass" if report.passed else f"fail ({', '.join(report.to_dict()['failed'])})"
    print(f"golden rows: {len(inputs)}; models: {args.baseline.name} vs {args.candidate.name}")
    bare_ms = statistics.median(bare_s) * 1000
    print(f"plain pass (load both + {len(inputs)} rows x 2 runs): median {bare_ms:.1f} ms")
    print(f"run_gate: median {statistics.median(gate_s) * 1000:.1f} ms (verdict: {verdict})")
    print(f"latency timed again (a noisy first pass) in {confirmed} of {len(gate_s)} gates")
    print(f"detection_map_abs_err_vs_pycocotools={err:.3g}")
    print(f"gate_detection_overhead_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
