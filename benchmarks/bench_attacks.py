#!/usr/bin/env python3
"""Play every row of the attack table against a served repository and a provisioned device.

The rows live in tests/security/attacks.py (the same ones tests/security/test_attacks.py
runs): a stale or wrong clock, a channel document dated ahead, online keys signing
far-future metadata, replayed and withheld metadata, revert_versions and replayed signed
reverts, another package name, a same-version twin, wrong, short and over-long downloads,
a channel naming an unsigned target, a fresh repository. Each row builds its own world
(operator keys, `repo init`, a real HTTP server on 127.0.0.1, a device state dir) under a
temp dir and prints one line: the row, what the attacker holds, the expected and the
observed outcome, the device's reason and the seconds it took. The last line is
`attacks_not_refused=<n>` (rows whose outcome was not the expected one, plus rows not
played before --deadline-s; target 0).

  python benchmarks/bench_attacks.py [--deadline-s 900] [--only SUBSTRING] [--keep]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import agent  # noqa: E402, F401  (first: opts out of onnxruntime's telemetry before it loads)


def _load_attacks() -> Any:
    path = REPO_ROOT / "tests" / "security" / "attacks.py"
    spec = importlib.util.spec_from_file_location("security_attacks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=900.0,
        help="stop starting rows after this many seconds; unplayed rows count as not refused",
    )
    parser.add_argument("--only", help="play only rows whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    # the device logs every OTA state; the table is the output here
    logging.basicConfig(level=logging.ERROR)
    attacks = _load_attacks()
    rows = [a for a in attacks.ATTACKS if not args.only or args.only in a.name]
    work = Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    started = time.monotonic()
    bad = 0
    try:
        for i, attack in enumerate(rows):
            if time.monotonic() - started > args.deadline_s:
                print(f"{attack.name!r}: NOT PLAYED (over --deadline-s {args.deadline_s:g})")
                bad += 1
                continue
            t0 = time.monotonic()
            outcome = attacks.play(attack, work / f"row{i:02d}")
            ok = attack.judge(outcome)
            bad += 0 if ok else 1
            reason = " ".join(outcome.reason.split())[:160]
            print(
                f"{'ok ' if ok else 'BAD'} {attack.name!r}: holds {attack.attacker_holds}; "
                f"expect {attack.expect}, got {outcome.result} ({reason}) "
                f"[{time.monotonic() - t0:.1f} s]",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"rows={len(rows)} elapsed_s={time.monotonic() - started:.1f}")
    print(f"attacks_not_refused={bad}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
