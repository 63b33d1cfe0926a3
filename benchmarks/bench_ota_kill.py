#!/usr/bin/env python3
"""SIGKILL a real agent process >= 1000 times across full OTA update cycles; count bad states.

A cycle is what a device lives through: restart (journal recovery, probation resumed),
check the channel of a TUF repository served on 127.0.0.1 and download + verify + gate +
activate 1.1.0 (INT8), probation -> commit, a bad 1.2.0 refused by the gate, an operator
rollback, then 1.3.0 from a local file through probation -> commit.

Each round forks a child that runs the cycle and dies by SIGKILL, interleaving two ways:
"point" (EDGE_AGENT_KILL_AT names a random point+hit count from a traced clean run) and
"time" (the parent kills it after a random delay within a clean cycle's duration). A
device copy lives through up to --kills-per-life kills in a row (so kills also land in the
recovery of the previous kill), then runs one clean cycle that must end on 1.3.0,
COMMITTED. After every kill a fresh process restarts the agent and checks: recovery
succeeds; the journal is at rest or on probation, its rows follow the transition table;
`current` (and `previous`) name packages that verify against the keyring; the current
model loads and gives finite logits; probation/rollback rows match the live version; a
COMMITTED journal has the floor at the live release; no extract-* left in staging.
Prints per-mode counts and `ota_kill_bad_states=<n>` last (target 0).

  python benchmarks/bench_ota_kill.py [--kills 1000] [--kills-per-life 3] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from agent.config import AgentConfig  # noqa: E402
from agent.ota import install  # noqa: E402
from agent.ota.killpoint import KILL_AT_ENV, KILL_TRACE_ENV, reset_kill_counts  # noqa: E402
from agent.ota.states import AT_REST, OTAState, check_transition  # noqa: E402
from agent.package import Keyring, ReleaseFloor, load_installed  # noqa: E402


def _load_helpers() -> Any:
    """The OTA tests' helpers (keys, signed packages, TUF repo, HTTP server) as a module."""
    path = REPO_ROOT / "tests" / "ota" / "conftest.py"
    spec = importlib.util.spec_from_file_location("ota_test_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


H = _load_helpers()


def full_cycle(dev: Any, packages: dict[str, Path]) -> None:
    """One agent life from start to 1.3.0 committed; resumable from wherever a kill left it."""
    # the gate's own code in this process: a child process per gate would turn a thousand
    # kills into hours, and this benchmark is about the journal, not the gate's isolation
    svc = dev.service(gate=H.in_process_gate(dev))
    svc.recover()
    svc.resume_probation()
    if svc.journal.state() is OTAState.PROBATION:
        H.feed_frames(svc, 20)
    if svc.release_floor("digits") < 2:
        with contextlib.suppress(Exception):
            svc.update_now()  # over HTTP: check, download, verify, gate, activate 1.1.0
        if svc.journal.state() is OTAState.PROBATION:
            H.feed_frames(svc, 20)
    with contextlib.suppress(Exception):
        svc.install_file(packages["bad"])
    if install.read_links(dev.state_dir).current == "digits-1.1.0":
        svc.rollback()
    if svc.release_floor("digits") < 4:
        with contextlib.suppress(Exception):
            svc.install_file(packages["good2"])
        if svc.journal.state() is OTAState.PROBATION:
            H.feed_frames(svc, 20)
    svc.close()


def run_child(
    dev: Any, packages: dict[str, Path], env: dict[str, str], kill_after_s: float | None
) -> int:
    """Fork one agent process running the cycle; returns its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            reset_kill_counts()
            os.environ.update(env)
            full_cycle(dev, packages)
        except BaseException:
            code = 1
        os._exit(code)
    if kill_after_s is not None:
        deadline = time.monotonic() + kill_after_s
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status


def check_after_restart(state_dir: Path, config: AgentConfig) -> list[str]:
    """What a restarted agent sees; returns the problems found (empty: a good state)."""
    problems: list[str] = []
    svc = H.OTAService(config)
    try:
        svc.recover()
    except Exception as exc:
        return [f"recover failed: {exc}"]
    last = svc.journal.last()
    history = svc.journal.history(limit=100000)
    for before, after in itertools.pairwise(history):
        try:
            check_transition(before.state, after.state)
        except Exception as exc:
            problems.append(f"journal: {exc}")
    if last is None or not (last.state in AT_REST or last.state is OTAState.PROBATION):
        problems.append(f"journal left in flight: {last.state.value if last else None}")
    keyring = Keyring.load(state_dir / "keyring")
    links = install.read_links(state_dir)
    manifests: dict[str, dict[str, Any]] = {}
    for which, name in (("current", links.current), ("previous", links.previous)):
        if name is None:
            if which == "current":
                problems.append("no current link")
            continue
        pkg_dir = install.resolve(state_dir, which)
        if pkg_dir is None:
            problems.append(f"{which} -> {name} dangles")
            continue
        try:
            load_installed(pkg_dir, keyring, check_files=True)
            manifests[which] = json.loads((pkg_dir / "manifest.json").read_bytes())
        except Exception as exc:
            problems.append(f"{which} -> {name} does not verify: {exc}")
    current = manifests.get("current")
    if current is not None:
        pkg_dir = install.resolve(state_dir, "current")
        assert pkg_dir is not None
        try:
            backend = svc.load_model(pkg_dir, current)
            out = backend.run(np.zeros((1, 1, 8, 8), np.float32))[0]
            backend.close()
            if out.shape != (1, 10) or not np.isfinite(out).all():
                problems.append(f"model {current['version']} gives bad output {out.shape}")
        except Exception as exc:
            problems.append(f"model {current.get('version')} does not run: {exc}")
        if last is not None and last.state in (OTAState.PROBATION, OTAState.ROLLED_BACK):
            # ROLLED_BACK names the release it left; from_version is what runs now.
            live = last.version if last.state is OTAState.PROBATION else last.from_version
            if live != current["version"]:
                problems.append(
                    f"journal {last.state.value} says {live} runs but current is "
                    f"{current['version']}"
                )
        if last is not None and last.state is OTAState.COMMITTED:
            with ReleaseFloor(state_dir / "state.db") as floor:
                value = floor.get("digits") or 0
            if value < int(current["release_counter"]):
                problems.append(f"COMMITTED {current['version']} but floor is {value}")
    staging = state_dir / "staging"
    if staging.is_dir() and any(p.name.startswith("extract-") for p in staging.iterdir()):
        problems.append("extract-* left in staging after recovery")
    svc.close()
    return problems


def check_in_child(dev: Any, final: bool = False) -> list[str]:
    """Run the restart check in a fresh process (the parent never holds a model session)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            problems = check_after_restart(dev.state_dir, dev.config)
            if final:
                # Done means 1.3.0 live and committed (the floor says so); the journal may
                # end REJECTED: a finished device still refuses the bad 1.2.0 each cycle.
                svc = H.OTAService(dev.config)
                links = install.read_links(dev.state_dir)
                if links.current != "digits-1.3.0" or svc.release_floor("digits") != 4:
                    problems.append(
                        f"clean cycle ended on {links.current}, floor {svc.release_floor('digits')}"
                    )
                svc.close()
        except BaseException as exc:
            problems = [f"check crashed: {type(exc).__name__}: {exc}"]
        os.write(write_fd, json.dumps(problems).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    result: list[str] = json.loads(b"".join(chunks) or b'["check child died"]')
    return result


class _QuietServer(H._Server):  # type: ignore[misc]  # H is loaded from a file: Any
    """The test HTTP server, minus tracebacks for clients the bench killed mid-transfer."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def copy_device(template: Any, where: Path) -> Any:
    shutil.copytree(template.state_dir, where / "state", symlinks=True)
    cfg = AgentConfig(
        device_id=template.config.device_id, state_dir=where / "state", ota=template.config.ota
    )
    return H.Device(where, where / "state", template.keys, cfg, template.packages)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000, help="SIGKILLs to deliver")
    parser.add_argument("--kills-per-life", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    server, thread = None, None
    with tempfile.TemporaryDirectory(prefix="bench-ota-kill-") as tmp_name:
        tmp = Path(tmp_name)
        # The TUF repository with 1.1.0 on the stable channel, served on 127.0.0.1.
        www = tmp / "www"
        www.mkdir()
        faults: dict[str, Any] = {}
        handler = lambda *a, **k: type("H", (H._Handler,), {"faults": faults})(  # noqa: E731
            *a, directory=str(www), **k
        )
        server = _QuietServer(("127.0.0.1", 0), handler)
        import threading

        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        template = H.repo_device(tmp / "template", url, www)
        svc = template.service()
        svc.install_file(template.package("1.0.0", 1))
        H.feed_frames(svc, 20)
        svc.close()
        H.publish_release(template, www, "1.1.0", 2, "digits_int8.onnx", precision="int8")
        packages = {
            "bad": template.package("1.2.0", 3, H.broken_digits_model()),
            "good2": template.package("1.3.0", 4),
        }
        # A traced clean cycle: the kill points it passes and how long it takes.
        trace = tmp / "trace.txt"
        traced = copy_device(template, tmp / "traced")
        started = time.monotonic()
        status = run_child(traced, packages, {KILL_TRACE_ENV: str(trace)}, None)
        cycle_s = time.monotonic() - started
        clean_problems = check_in_child(traced, final=True)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0) or clean_problems:
            print(f"clean cycle failed: status {status}, {clean_problems}", file=sys.stderr)
            return 1
        points = trace.read_text().split()
        states = sorted({p.split(":")[1].split("#")[0] for p in points if "journal.saved" in p})
        print(f"clean cycle: {len(points)} kill points, {cycle_s:.2f} s, states {' '.join(states)}")

        kills = {"point": 0, "time": 0}
        bad = {"point": 0, "time": 0, "clean": 0}
        misses = 0
        lives = 0
        examples: list[str] = []
        total = 0
        bench_started = time.monotonic()
        while total < args.kills and misses < 10 * args.kills:
            lives += 1
            dev = copy_device(template, tmp / f"life{lives}")
            in_life = 0
            # A resumed life has less left to do: random delays shrink to what a run took.
            life_cycle_s = cycle_s
            while in_life < args.kills_per_life and total < args.kills:
                mode = "point" if total % 2 == 0 else "time"
                if mode == "point":
                    env, delay = {KILL_AT_ENV: rng.choice(points)}, None
                else:
                    env, delay = {}, rng.uniform(0.0, life_cycle_s)
                run_started = time.monotonic()
                status = run_child(dev, packages, env, delay)
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    misses += 1  # the cycle finished before the kill: not a kill
                    life_cycle_s = time.monotonic() - run_started
                    continue
                kills[mode] += 1
                total += 1
                in_life += 1
                problems = check_in_child(dev)
                if problems:
                    bad[mode] += 1
                    if len(examples) < 10:
                        examples.append(f"{mode} {env or round(delay or 0, 3)}: {problems}")
            # The device carries on: one clean cycle must end on 1.3.0, committed.
            run_child(dev, packages, {}, None)
            problems = check_in_child(dev, final=True)
            if problems:
                bad["clean"] += 1
                if len(examples) < 10:
                    examples.append(f"clean cycle after {in_life} kills: {problems}")
            shutil.rmtree(tmp / f"life{lives}")
            if lives % 50 == 0:
                rate = total / (time.monotonic() - bench_started)
                print(f"  {total} kills, {sum(bad.values())} bad, {rate:.1f} kills/s", flush=True)
        server.shutdown()
        server.server_close()
    elapsed = time.monotonic() - bench_started
    for line in examples:
        print("bad:", line)
    print(
        f"kills: {total} ({kills['point']} at named points, {kills['time']} at random times) "
        f"in {lives} device lives, {misses} runs finished before their kill, {elapsed:.0f} s"
    )
    print(
        f"bad after point kills={bad['point']} after time kills={bad['time']} "
        f"clean cycles not ending on 1.3.0 COMMITTED={bad['clean']}"
    )
    print(f"ota_kill_bad_states={sum(bad.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
