#!/usr/bin/env python3
"""Mixed faults against real OTA update cycles (>= 1000 rounds); count the bad states left.

Reuses bench_ota_kill.py's machinery (a TUF repository on 127.0.0.1, forked agent
processes, the restart check). A device copy lives on a small tmpfs and goes through
--rounds-per-life rounds; each round starts the agent as the daemon does
(``recover_at_start``: quarantine + journal recovery), runs what is left of the update
cycle (1.1.0 over HTTP through probation to a commit, a bad 1.2.0 the gate refuses, an
operator rollback, 1.3.0 from a file) with one fault:

  kill_point   SIGKILL at the n-th named kill point the run passes (n at random)
  kill_time    SIGKILL after a random delay
  enospc       the tmpfs is filled at the n-th kill point the run passes (real ENOSPC for
               every later write); once the cycle gave up, the disk is freed and the SAME
               process polls again: that poll must clear whatever the failed writes left
               (no "X -> Y is not allowed")
  corrupt_db   state.db overwritten (not a database, or pages that fail quick_check)
               before the start: quarantined and rebuilt from the links
  clock_jump   the process's wall clock (time.time) jumps by -3 y .. +3 y
  crash_cand   the bad candidate crashes the runtime while the gate child loads it
               (SIGSEGV, SIGABRT or SIGKILL at its model.load): REJECTED "gate process
               killed by SIG...", the agent goes on
  kill_gate    the bad candidate's gate child is SIGKILLed from outside (as the kernel's
               OOM killer or an operator would) while it runs
  hang_cand    the bad candidate's model never returns (a Loop of 2**62 trips): the gate
               child is killed at gate_timeout_s, REJECTED "gate timed out after N s"

After each round a fresh process checks: recovery works; the journal follows the
transition table, is at rest or on probation, and agrees with the links; `current` and
`previous` verify against the keyring; the current model gives finite logits; and one
poll (right clock, disk free) ends at rest or on probation: OTA is not wedged; no gate
child outlives its round and staging holds no extract or gate files. A life
ends with one clean cycle that must reach 1.3.0 COMMITTED. Prints counts per fault and
`ota_fault_bad_states=<n>` last (target 0).

  python benchmarks/bench_ota_faults.py [--rounds 1000] [--rounds-per-life 6] [--seed 1]
      [--gate-timeout-s 20]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


K = _load("bench_ota_kill", REPO_ROOT / "benchmarks" / "bench_ota_kill.py")
H = K.H
# real misbehaving ONNX candidates (the hanging one), shared with tests/ota
F = _load("ota_fault_models", REPO_ROOT / "tests" / "ota" / "fault_models.py")

from agent.config import AgentConfig  # noqa: E402
from agent.ota import install  # noqa: E402
from agent.ota.gate_process import GATE_KILL_AT_ENV  # noqa: E402
from agent.ota.killpoint import (  # noqa: E402
    KILL_SIGNAL_ENV,
    KILL_TRACE_ENV,
    reset_kill_counts,
)
from agent.ota.service import OTAService, recover_at_start  # noqa: E402
from agent.ota.states import AT_REST, OTAState  # noqa: E402

FAULTS = (
    "kill_point",
    "kill_time",
    "enospc",
    "corrupt_db",
    "clock_jump",
    "crash_cand",
    "kill_gate",
    "hang_cand",
)
# relative weights of the faults in a round (the gate faults are also forced on some
# lives' first round: only a device below the bad release's counter still gates it)
WEIGHTS = (3, 2, 3, 1, 1, 1, 1, 1)
GATE_FAULTS = ("crash_cand", "kill_gate", "hang_cand")
CRASH_SIGNALS = ("SIGSEGV", "SIGABRT", "SIGKILL")
BAD_VERSION = "1.2.0"
GATE_CHILD = "agent.ota.gate_process"
# Latency on 2 busy shared cores is noise; the golden set is cut for speed (the gate is
# benchmarked on its own in bench_gate.py): the checks still run on real models.
GOLDEN_ROWS = 160
TMPFS_SIZE = "24m"
YEAR_S = 365 * 86400.0


# ------------------------------------------------------------------ the agent's life


def cycle(dev: Any, packages: dict[str, Path], bad: str = "bad") -> OTAService:
    """Start as the daemon does, then do what is left of the update cycle; every step is
    an OTA operation of its own (a failed one is cleared by the next, as in the daemon)."""
    recover_at_start(dev.config)
    # time.time looked up now: a clock_jump round has patched it
    svc = OTAService(dev.config, system_clock=time.time)
    svc.resume_probation()

    def step(work: Any) -> None:
        with contextlib.suppress(Exception), svc.step():
            work()

    def probation() -> None:
        if svc.journal.state() is OTAState.PROBATION:
            H.feed_frames(svc, 20)

    step(probation)
    if svc.release_floor("digits") < 2:
        step(svc.update_now)  # over HTTP: check, download, verify, gate, activate 1.1.0
        step(probation)
    step(lambda: svc.install_file(packages[bad]))
    if install.read_links(dev.state_dir).current == "digits-1.1.0":
        step(svc.rollback)
    if svc.release_floor("digits") < 4:
        step(lambda: svc.install_file(packages["good2"]))
        step(probation)
    return svc


def next_poll(svc: OTAService) -> list[str]:
    """One more poll in the same process; what shows OTA wedged (empty: not wedged)."""
    problems: list[str] = []
    try:
        with svc.step():
            svc.update_now()
            if svc.journal.state() is OTAState.PROBATION:
                H.feed_frames(svc, 20)
    except Exception as exc:
        if "is not allowed" in str(exc):
            problems.append(f"wedged: {exc}")
    last = svc.journal.last()
    if last is not None and not (last.state in AT_REST or last.state is OTAState.PROBATION):
        problems.append(f"next poll left {last.state.value} in flight")
    return problems


KILL_NTH = "BENCH_KILL_NTH"


class _AtNthPoint(Counter[str]):
    """kill_point's hit counter, calling ``action`` once the n-th point of this run is
    reached (whatever its name: the points left depend on where earlier faults left the
    device)."""

    def __init__(self, nth: int, action: Any) -> None:
        super().__init__()
        self.nth = nth
        self.passed = 0
        self.action = action

    def __setitem__(self, key: str, value: int) -> None:
        self.passed += 1
        if self.passed == self.nth:
            self.action()
        super().__setitem__(key, value)


def at_nth_point(nth: int, action: Any) -> None:
    from agent.ota import killpoint

    killpoint._hits = _AtNthPoint(nth, action)
    # kill_point() returns at once unless one of its variables is set
    os.environ[KILL_TRACE_ENV] = os.devnull


def kill_at_nth_point(nth: int) -> None:
    at_nth_point(nth, lambda: os.kill(os.getpid(), signal.SIGKILL))


def disk_full_at_nth_point(nth: int, fd: int) -> None:
    """At the n-th point, have the parent fill the disk (and wait until it is full)."""

    def ask() -> None:
        os.write(fd, b"fill\n")
        os.read(fd, 1)

    at_nth_point(nth, ask)


def gate_rejected(svc: OTAService, since_s: float, prefix: str) -> bool:
    """The bad release was REJECTED in this run with a reason starting with ``prefix``."""
    return any(
        e.state is OTAState.REJECTED
        and e.version == BAD_VERSION
        and e.ts >= since_s
        and e.reason.startswith(prefix)
        for e in svc.journal.history(limit=200)
    )


def child_main(
    dev: Any, packages: dict[str, Path], fault: str, env: dict[str, str], jump_s: float, fd: int
) -> None:
    """The forked agent process of one round (never returns)."""
    code = 0
    problems: list[str] = []
    landed = False
    started_s = time.time()
    try:
        reset_kill_counts()
        os.environ.update(env)
        if fault == "kill_point":
            kill_at_nth_point(int(env.pop(KILL_NTH)))
        if fault == "enospc":
            disk_full_at_nth_point(int(env.pop(KILL_NTH)), fd)
        if fault == "clock_jump":
            real = time.time
            time.time = lambda: real() + jump_s  # the whole process sees a wrong clock
        svc = cycle(dev, packages, "hang" if fault == "hang_cand" else "bad")
        if fault in GATE_FAULTS:
            landed = gate_rejected(svc, started_s, env.pop(EXPECT_ENV))
        if fault == "enospc":
            os.write(fd, b"cycle-done\n")
            # wait for the parent to free the disk, then poll again in this process
            os.read(fd, 1)
            problems = next_poll(svc)
        svc.close()
    except BaseException as exc:
        problems = [f"agent crashed: {type(exc).__name__}: {exc}"]
        code = 1
    from agent.ota import killpoint

    passed = getattr(killpoint._hits, "passed", 0)
    with contextlib.suppress(OSError):
        report = {"problems": problems, "points": passed, "landed": landed}
        os.write(fd, (json.dumps(report) + "\n").encode())
    os._exit(code)


def run_round(
    dev: Any,
    packages: dict[str, Path],
    fault: str,
    rng: random.Random,
    points_left: int,
    cycle_s: float,
    disk: Path,
) -> tuple[bool, list[str], str]:
    """Fork one agent process with ``fault``; returns (fault landed, problems, detail)."""
    env: dict[str, str] = {}
    kill_after_s: float | None = None
    jump_s = 0.0
    detail = ""
    if fault in ("kill_point", "enospc"):
        nth = rng.randint(1, max(1, points_left))
        env[KILL_NTH] = str(nth)
        detail = f"at kill point {nth} of about {points_left}"
    elif fault == "kill_time":
        kill_after_s = rng.uniform(0.05, 0.9 * cycle_s)
        detail = f"after {kill_after_s:.2f} s"
    elif fault == "crash_cand":
        # the gate child, not the agent, hits the fault (GATE_KILL_AT_ENV reaches only it)
        env[GATE_KILL_AT_ENV] = f"model.load:digits-{BAD_VERSION}"
        env[KILL_SIGNAL_ENV] = rng.choice(CRASH_SIGNALS)
        env[EXPECT_ENV] = f"gate process killed by {env[KILL_SIGNAL_ENV]}"
        detail = f"{env[KILL_SIGNAL_ENV]} at model.load"
    elif fault == "kill_gate":
        env[EXPECT_ENV] = "gate process killed by SIGKILL"
        detail = "SIGKILL from outside"
    elif fault == "hang_cand":
        env[EXPECT_ENV] = "gate timed out after"
        detail = "a model that never returns"
    elif fault == "clock_jump":
        jump_s = rng.choice((-3, -1, -1 / 365, 1 / 365, 1, 3)) * YEAR_S
        detail = f"{jump_s / YEAR_S:+.3f} y"
    elif fault == "corrupt_db":
        detail = corrupt_state_db(dev.state_dir / "state.db", rng)
    parent_fd, child_fd = socket_pair()
    pid = os.fork()
    if pid == 0:
        os.close(parent_fd)
        child_main(dev, packages, fault, env, jump_s, child_fd)
    os.close(child_fd)
    killer = None
    if fault == "kill_gate":
        killer = GateKiller(pid)
        killer.start()
    landed = fault in ("corrupt_db", "clock_jump", "none")
    if fault == "enospc":
        if wait_line(parent_fd, None) == b"fill\n":
            # the cycle is at its n-th kill point: the disk fills under it
            fill(disk)
            landed = True
            with contextlib.suppress(BrokenPipeError):
                os.write(parent_fd, b"f")
            wait_line(parent_fd, None)
        with contextlib.suppress(OSError):
            (disk / "filler").unlink()
        # the disk is free again: poll (a cycle that ended before its fill point has
        # already closed its end: nothing to tell it)
        with contextlib.suppress(BrokenPipeError):
            os.write(parent_fd, b"g")
    status: int | None = None
    if kill_after_s is not None:
        deadline = time.monotonic() + kill_after_s
        while time.monotonic() < deadline:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                status = wait_status
                break
            time.sleep(0.005)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    report = read_all(parent_fd)
    os.close(parent_fd)
    if status is None:
        _, status = os.waitpid(pid, 0)
    if killer is not None:
        killer.stop.set()
        killer.join()
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if fault in ("kill_point", "kill_time"):
        landed = killed
    problems: list[str] = []
    passed = 0
    if fault in GATE_FAULTS and killed:
        problems.append("the agent itself was killed by its candidate's gate")
    if not killed:
        lines = [x for x in report.splitlines() if x.startswith("{")]
        reported = json.loads(lines[-1]) if lines else {"problems": ["agent died silently"]}
        problems, passed = list(reported["problems"]), int(reported.get("points", 0))
        if fault in GATE_FAULTS:
            # landed: the bad release was refused with this fault's reason in this run
            landed = bool(reported.get("landed"))
            if killer is not None and killer.killed and not landed:
                problems.append("its gate child was killed but the release was not refused for it")
    problems += gate_leftovers(dev.root)
    if not landed and passed:
        detail = f"{detail}; the run passed {passed} points"
    return landed, problems, detail


EXPECT_ENV = "BENCH_EXPECT_REASON"


class GateKiller(threading.Thread):
    """SIGKILLs the bad release's gate child of ``agent_pid`` from outside, once it runs."""

    def __init__(self, agent_pid: int) -> None:
        super().__init__(name="gate-killer", daemon=True)
        self.agent_pid = agent_pid
        self.stop = threading.Event()
        self.killed = False

    def run(self) -> None:
        import psutil

        try:
            agent = psutil.Process(self.agent_pid)
        except psutil.Error:
            return
        while not self.stop.is_set() and not self.killed:
            with contextlib.suppress(psutil.Error):
                for child in agent.children():
                    if self._gates_bad_release(child):
                        # let it get into the runtime first: the kill lands mid-gate
                        self.stop.wait(random.uniform(0.0, 1.0))
                        with contextlib.suppress(psutil.Error):
                            child.send_signal(signal.SIGKILL)
                            self.killed = True
                        break
            self.stop.wait(0.02)

    @staticmethod
    def _gates_bad_release(child: Any) -> bool:
        line = child.cmdline()
        if GATE_CHILD not in " ".join(line):
            return False
        try:  # the request file names the candidate's manifest
            request = json.loads(Path(line[-2]).read_bytes())
        except (OSError, ValueError, IndexError):
            return False
        return bool(request["manifest"].get("version") == BAD_VERSION)


def gate_leftovers(root: Path, grace_s: float = 10.0) -> list[str]:
    """A gate child still alive ``grace_s`` after its agent ended (it must die with its
    parent: PR_SET_PDEATHSIG; the kernel needs a moment to deliver it on a busy machine)."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info.get("cmdline") or ())
        if GATE_CHILD in line and str(root) in line:
            procs.append(proc)
    _gone, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [f"gate child {proc.pid} outlived its agent" for proc in alive]


def socket_pair() -> tuple[int, int]:
    import socket

    a, b = socket.socketpair()
    return a.detach(), b.detach()


def wait_line(fd: int, timeout_s: float | None) -> bytes | None:
    """Block for the child's "cycle-done" line, at most ``timeout_s`` (None: forever)."""
    import select

    ready, _, _ = select.select([fd], [], [], timeout_s)
    if not ready:
        return None
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


def read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def fill(disk: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def corrupt_state_db(path: Path, rng: random.Random) -> str:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if not path.exists() or rng.random() < 0.5:
        path.write_bytes(rng.randbytes(8192))
        return "not a database"
    data = bytearray(path.read_bytes())
    for page in range(1, len(data) // 4096):
        data[page * 4096 : page * 4096 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    return "pages that fail quick_check"


# ------------------------------------------------------------------ checks


def check_and_poll(dev: Any, final: bool = False) -> list[str]:
    """bench_ota_kill's restart check, then one poll (OTA not wedged), in a fresh process."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            problems = K.check_after_restart(dev.state_dir, dev.config)
            svc = OTAService(dev.config)
            problems += next_poll(svc)
            problems += links_agree(svc, dev.state_dir)
            problems += staging_leftovers(dev.state_dir)
            if final:
                links = install.read_links(dev.state_dir)
                floor = svc.release_floor("digits")
                if links.current != "digits-1.3.0" or floor != 4:
                    problems.append(f"clean cycle ended on {links.current}, floor {floor}")
            svc.close()
        except BaseException as exc:
            problems = [f"check crashed: {type(exc).__name__}: {exc}"]
        os.write(write_fd, json.dumps(problems).encode())
        os._exit(0)
    os.close(write_fd)
    data = read_all(read_fd)
    os.close(read_fd)
    os.waitpid(pid, 0)
    result: list[str] = json.loads(data or '["check child died"]')
    return result


def staging_leftovers(state_dir: Path) -> list[str]:
    """After a poll at rest, staging holds no extracted package and no gate file."""
    staging = state_dir / "staging"
    if not staging.is_dir():
        return []
    left = [p.name for p in staging.iterdir() if p.name.startswith(("extract-", "gate-"))]
    return [f"staging left: {sorted(left)}"] if left else []


def links_agree(svc: OTAService, state_dir: Path) -> list[str]:
    """The journal's last word on what runs names what ``current`` links to."""
    last = svc.journal.last()
    current = svc.current_version()
    if last is None or not current:
        return [] if current else ["no current model"]
    if last.state is OTAState.COMMITTED and last.version and last.version != current:
        # a REJECTED/IDLE row after it is fine; a COMMITTED row must name what runs
        return [f"journal COMMITTED {last.version} but current is {current}"]
    return []


# ------------------------------------------------------------------ main


def mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        print(f"enospc rounds skipped: cannot mount a tmpfs ({done.stderr.strip()})")
    return done.returncode == 0


def set_gate_timeout(golden: Path, timeout_s: float) -> None:
    policy = golden / "policy.yaml"
    policy.write_text(policy.read_text() + f"gate_timeout_s: {timeout_s:g}\n")


def cut_golden(golden: Path) -> None:
    for name in ("inputs.npy", "labels.npy", "slices.npy"):
        path = golden / name
        if path.exists():
            np.save(path, np.load(path, allow_pickle=False)[:GOLDEN_ROWS])


def past_bad_release(dev: Any) -> bool:
    from agent.package import ReleaseFloor

    with contextlib.suppress(Exception), ReleaseFloor(dev.state_dir / "state.db") as floor:
        return (floor.get("digits") or 0) >= 3
    return False


def copy_device(template: Any, where: Path) -> Any:
    shutil.copytree(template.state_dir, where / "state", symlinks=True)
    cfg = AgentConfig(
        device_id=template.config.device_id, state_dir=where / "state", ota=template.config.ota
    )
    return H.Device(where, where / "state", template.keys, cfg, template.packages)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="fault rounds to run")
    parser.add_argument("--rounds-per-life", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gate-timeout-s",
        type=float,
        default=20.0,
        help="the golden set's gate_timeout_s (a hang_cand round waits this long)",
    )
    args = parser.parse_args()
    # the agent logs each quarantine and refusal; the bench reports its own counts
    logging.getLogger("agent").setLevel(logging.CRITICAL)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-ota-faults-") as tmp_name:
        tmp = Path(tmp_name)
        disk = tmp / "disk"
        have_tmpfs = mount_tmpfs(disk)
        faults = [f for f in FAULTS if have_tmpfs or f != "enospc"]
        weights = [w for f, w in zip(FAULTS, WEIGHTS, strict=True) if f in faults]
        www = tmp / "www"
        www.mkdir()
        served: dict[str, Any] = {}
        handler = lambda *a, **k: type("H", (H._Handler,), {"faults": served})(  # noqa: E731
            *a, directory=str(www), **k
        )
        server = K._QuietServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            template = H.repo_device(tmp / "template", url, www)
            cut_golden(template.config.ota.golden_dir)
            set_gate_timeout(template.config.ota.golden_dir, args.gate_timeout_s)
            svc = template.service()
            svc.install_file(template.package("1.0.0", 1))
            H.feed_frames(svc, 20)
            svc.close()
            H.publish_release(template, www, "1.1.0", 2, "digits_int8.onnx", precision="int8")
            packages = {
                "bad": template.package("1.2.0", 3, H.broken_digits_model()),
                "good2": template.package("1.3.0", 4),
                "hang": template.package(BAD_VERSION, 3, F.hanging_model()),
            }
            trace = tmp / "trace.txt"
            traced = copy_device(template, tmp / "traced")
            started = time.monotonic()
            os.environ[KILL_TRACE_ENV] = str(trace)
            _, problems, _ = run_round(traced, packages, "none", rng, 0, 0.0, disk)
            del os.environ[KILL_TRACE_ENV]
            cycle_s = time.monotonic() - started
            problems += check_and_poll(traced, final=True)
            if problems:
                print(f"clean cycle failed: {problems}", file=sys.stderr)
                return 1
            points = trace.read_text().split()
            print(f"clean cycle: {len(points)} kill points, {cycle_s:.2f} s")
            rounds: Counter[str] = Counter()
            missed: Counter[str] = Counter()
            bad: Counter[str] = Counter()
            examples: list[str] = []
            lives = 0
            bench_started = time.monotonic()
            where = disk if have_tmpfs else tmp
            while sum(rounds.values()) < args.rounds:
                lives += 1
                dev = copy_device(template, where / f"life{lives}")
                in_life = 0
                # What is left of the cycle shrinks as the life goes on: the n-th kill point
                # and the delays are drawn from what the last run that ended passed.
                points_left, life_run_s = len(points), cycle_s
                while in_life < args.rounds_per_life and sum(rounds.values()) < args.rounds:
                    fault = rng.choices(faults, weights)[0]
                    if in_life == 0 and rng.random() < 0.4:
                        fault = rng.choice(GATE_FAULTS)  # a fresh device still gates 1.2.0
                    if fault in GATE_FAULTS and past_bad_release(dev):
                        continue  # 1.2.0 is below the floor now: it never reaches the gate
                    run_started = time.monotonic()
                    landed, problems, detail = run_round(
                        dev, packages, fault, rng, points_left, life_run_s, disk
                    )
                    if not landed:
                        life_run_s = max(0.2, time.monotonic() - run_started)
                        if fault in ("kill_point", "enospc"):
                            # the whole run passed fewer points than drawn: draw from those
                            passed = detail.rpartition("passed ")[2].split(" ")[0]
                            points_left = int(passed) if passed.isdigit() else points_left // 2
                            points_left = max(1, points_left)
                        missed[fault] += 1  # the cycle ended before the kill: no fault
                        if missed.total() > 20 * args.rounds:
                            print("too many rounds without a fault", file=sys.stderr)
                            return 1
                        continue
                    rounds[fault] += 1
                    in_life += 1
                    problems += check_and_poll(dev)
                    if problems:
                        bad[fault] += 1
                        if len(examples) < 12:
                            examples.append(f"{fault} ({detail}): {problems}")
                            print(f"  bad: {examples[-1]}", flush=True)
                # The device carries on: a clean cycle must end on 1.3.0, committed.
                _, problems, _ = run_round(dev, packages, "none", rng, 0, cycle_s, disk)
                problems += check_and_poll(dev, final=True)
                if problems:
                    bad["clean"] += 1
                    if len(examples) < 12:
                        examples.append(f"clean cycle after {in_life} faults: {problems}")
                        print(f"  bad: {examples[-1]}", flush=True)
                shutil.rmtree(where / f"life{lives}")
                if lives % 20 == 0:
                    rate = rounds.total() / (time.monotonic() - bench_started)
                    print(
                        f"  {rounds.total()} rounds, {bad.total()} bad, {rate:.2f} rounds/s",
                        flush=True,
                    )
        finally:
            server.shutdown()
            server.server_close()
            if have_tmpfs:
                subprocess.run(["umount", "-l", str(disk)], check=False)
    elapsed = time.monotonic() - bench_started
    for line in examples:
        print("bad:", line)
    print(
        f"rounds: {rounds.total()} in {lives} device lives, {elapsed:.0f} s; "
        + ", ".join(f"{f}={rounds[f]}" for f in faults)
        + f"; runs that ended before their fault: {dict(missed)}"
    )
    print("bad per fault: " + ", ".join(f"{f}={bad[f]}" for f in (*faults, "clean")))
    print(f"ota_fault_bad_states={bad.total()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
