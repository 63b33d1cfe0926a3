"""Docs as tests: the ```bash / ```console / ```sh blocks of README.md and docs/*.md, run in
a temp dir in document order, their shown output compared with placeholders."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"<!--\s*(hardware-only|doc-test:\s*skip)\s*:?\s*(.*?)\s*-->")
# Covered files. Others change docs/*.md right now; each file joins this list once its
# blocks pass (or carry a marker saying why they cannot run here).
COVERED = (
    "README.md",
    "docs/fleet.md",
    "docs/packages.md",
    "docs/ota.md",
    "docs/telemetry.md",
    "docs/gate.md",
    "docs/daemon.md",
    "docs/install.md",
    "docs/jetson.md",
    "docs/raspberry-pi.md",
    "docs/x86.md",
)
COMMAND_TIMEOUT_S = 180
# <!-- doc-test: setup COMMANDS --> above a block runs COMMANDS first: what the text around
# the block tells the reader to do ("and release-2, release-3").
SETUP = re.compile(r"<!--\s*doc-test:\s*setup\s+(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # "hardware-only: why" / "skip: why" from the comment above
    setup: str | None = None


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    exit_code: int | None = None  # None: 0, or non-zero when the output shows "Error:"


def extract_blocks(doc: str) -> list[Block]:
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang not in ("bash", "console", "sh"):
            continue
        marker = setup = None
        for back in range(start - 1, max(-1, start - 4), -1):
            found = MARKER.search(lines[back])
            if found:
                kind = "hardware-only" if found.group(1) == "hardware-only" else "skip"
                marker = f"{kind}: {found.group(2) or 'marked in the doc'}"
                continue
            found = SETUP.search(lines[back])
            if found:
                setup = found.group(1)
                continue
            if lines[back].strip():
                break
        blocks.append(Block(doc, start + 1, lang, "\n".join(body), marker, setup))
    return blocks


def console_steps(text: str) -> list[Step]:
    """`$ command` lines (with `\\` continuations) and the output shown under each."""
    steps: list[Step] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            step = Step(command)
            code = re.search(r"#\s*exit (\d+)\s*$", command)
            if code:
                step.exit_code = int(code.group(1))
            steps.append(step)
        elif steps:
            steps[-1].expected.append(line)
        i += 1
    return steps


HEX = re.compile(r"\b[0-9a-f]{8,}\b")
ISO = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?")
FLOAT = re.compile(r"(?<![\d.])\d+\.\d+(?![\d.])")  # 0.25, not a version 1.1.0
BIG_INT = re.compile(r"\b\d{4,}\b")
TOKEN = re.compile(r"\b[A-Za-z0-9_-]{40,}\b")  # tokens shown once: random
SHOWN_TOKEN = re.compile(r"^[A-Za-z0-9_-]{2,}\.\.\.[A-Za-z0-9_-]{2,}(?=\s|$)")  # "hV3q...Zk"


def normalize(line: str, workdir: Path) -> str:
    """Placeholders for what differs per run: the temp dir, hashes, times, sizes, tokens."""
    line = line.replace(str(workdir) + "/", "").replace(str(workdir), ".")
    line = SHOWN_TOKEN.sub("<token>", line)
    line = ISO.sub("<time>", line)
    line = HEX.sub("<hex>", line)
    line = TOKEN.sub("<token>", line)
    line = FLOAT.sub("<num>", line)
    line = BIG_INT.sub("<num>", line)
    line = re.sub(r"-{2,}", "--", line)  # table rules are as wide as the values
    return re.sub(r"\s+", " ", line).strip()


def shown_matches(expected: list[str], actual: list[str], workdir: Path) -> str | None:
    """None when every shown line appears, in order, in the real output (docs may trim
    lines; `...` inside a line matches anything). Else the first line not found."""
    got = [normalize(a, workdir) for a in actual]
    at = 0
    for want_raw in expected:
        want_raw = re.sub(r"\s+#\s.*$", "", want_raw)  # a "# note" after shown output
        want = normalize(want_raw, workdir)
        if not want or want == "...":
            continue
        pattern = re.compile("^" + ".*".join(re.escape(part) for part in want.split("...")) + "$")
        while at < len(got) and not pattern.match(got[at]):
            at += 1
        if at == len(got):
            return want_raw
        at += 1
    return None


def run_shell(command: str, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,  # a command that asks (a passphrase) fails, not hangs
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return subprocess.CompletedProcess(
            exc.cmd, 124, out, f"(still running after {COMMAND_TIMEOUT_S} s)"
        )


def doc_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(workdir / "home")
    env["SOURCE_DATE_EPOCH"] = "1795435200"  # 2026-11-23: reproducible package bytes
    return env


def prepare(workdir: Path) -> None:
    """What a reader has beside the docs: the repository's files and docs/examples/."""
    (workdir / "home").mkdir()
    for item in EXAMPLES.iterdir():
        dest = workdir / item.name
        if item.is_dir():
            shutil.copytree(item, dest)
        else:
            shutil.copy(item, dest)
    for name in ("agent", "golden_local", "docs", "tools"):
        (workdir / name).symlink_to(ROOT / name)


# Blocks that cannot run in a test, keyed by (doc, start of the first command), with why.
# Everything else in COVERED runs.
CANNOT_RUN = {
    ("README.md", "bash tools/demo.sh"): "the whole demo (minutes); CI runs it as tools/demo.sh",
    (
        "README.md",
        "edge-agent run --config docs/examples/agent.yaml",
    ): "a daemon that runs until killed",
    ("README.md", "edge-agent status --config docs/examples/agent.yaml"): "needs the daemon above",
    (
        "README.md",
        "edge-agent status --watch --state-dir /tmp/op_demo/st",
    ): "needs a running daemon",
    (
        "README.md",
        "edge-agent telemetry status --state-dir /var/lib/edge-agent",
    ): "a provisioned device's /var/lib",
    (
        "README.md",
        "edge-agent provision --state-dir /var/lib/edge-agent",
    ): "a device's /var/lib and its repository",
    (
        "README.md",
        "edge-agent install --config agent.yaml digits-1.1.0.tar",
    ): "a provisioned device with a daemon",
    (
        "README.md",
        "edge-agent install dist/shapes-1.1.0.tar --config agent.yaml",
    ): "the detector packages and daemon of tests/e2e/test_detector_install.py, which runs it",
    (
        "README.md",
        "edge-agent serve --repo ./repo --db postgresql://",
    ): "a PostgreSQL server at db.example",
    (
        "README.md",
        "packaging/deb/build.sh --out dist",
    ): "sudo apt install on the target (tests/shipping builds the .deb)",
    ("README.md", "bash tools/setup.sh"): "creates the .venv the tests run in",
    (
        "docs/ota.md",
        "edge-agent status --config agent.yaml",
    ): "the running daemon of the OTA demo (tools/demo_ota.sh)",
    (
        "docs/ota.md",
        "edge-agent rollback --config agent.yaml",
    ): "a daemon that holds the state dir's lock and does not answer yet",
    (
        "docs/daemon.md",
        "edge-agent run --config docs/examples/agent.yaml &",
    ): "a daemon in the reader's shell until `kill %1` (tests/daemon runs it)",
    (
        "docs/daemon.md",
        "edge-agent status --config agent.yaml",
    ): "the running daemon of the OTA demo (tools/demo_ota.sh)",
    ("docs/install.md", "packaging/deb/build.sh --out dist"): "sudo apt install on the target",
    (
        "docs/install.md",
        "sudo edge-agent provision --state-dir /var/lib/edge-agent",
    ): "a device's /var/lib, its repository and the edge-agent user",
    ("docs/install.md", "sudo packaging/deb/test_in_chroot.sh"): "root and a chroot",
    ("docs/install.md", "sudo apt-get install systemd-container"): "root, apt and systemd-nspawn",
    ("docs/install.md", "sudo packaging/install.sh"): "installs into /opt and /etc",
    ("docs/install.md", "python3 -m venv ~/ea"): "pip install into a new venv (network)",
    ("docs/jetson.md", "packaging/deb/build.sh --out dist --jetson"): "a Jetson with JetPack",
    ("docs/raspberry-pi.md", "sudo apt install -y python3-venv git"): "a Raspberry Pi (sudo apt)",
    ("docs/x86.md", "packaging/deb/build.sh --out dist"): "sudo apt install on the target",
    (
        "docs/fleet.md",
        "edge-agent serve --repo ./repo --db fleet.db",
    ): "a server that runs until killed",
    (
        "docs/fleet.md",
        'curl -s -H "Authorization: Bearer $EDGE_AGENT_OPERATOR_TOKEN"',
    ): "needs the server above",
    ("docs/fleet.md", "pip install 'edge-agent[server]'"): "PostgreSQL on db.example and pip",
    (
        "README.md",
        "edge-agent keys generate --role root --out keys/",
    ): "ends in `serve`, which runs until killed; docs/fleet.md's blocks run the same steps",
    (
        "README.md",
        "edge-agent rollout status --channel stable --repo repo --db fleet.db",
    ): "needs the server's fleet.db with device reports",
}
# Single commands (doc, start of the command) inside a block that runs otherwise.
SKIP_COMMANDS = {
    (
        "README.md",
        "edge-agent gate --baseline agent/demo/models/digits_fp32.onnx --candidate bias3.onnx",
    ): "bias3.onnx is made by tools/demo_ota.sh (the demo runs it)",
    (
        "docs/fleet.md",
        "edge-agent rollout status --channel stable --server",
    ): "needs a running server",
}


# `edge-agent gate` also judges latency (candidate p95 against the baseline's, measured in
# the same run): on a loaded machine one spike fails it. Such a command gets one more run
# before it counts; a doc that is wrong fails both.
TIMING_RETRIES = 1


def _timed(command: str) -> bool:
    return command.strip().startswith("edge-agent gate ")


def _lookup(table: dict[tuple[str, str], str], doc: str, command: str) -> str | None:
    for (where, start), why in table.items():
        if where == doc and command.startswith(start):
            return why
    return None


def first_command(block: Block) -> str:
    for line in block.text.splitlines():
        text = line[2:] if line.startswith("$ ") else line
        if text.strip() and not text.startswith("#"):
            return re.sub(r"\s+#\s.*$", "", text).rstrip(" \\").strip()
    return ""


def _cases() -> list[tuple[str, list[Block]]]:
    return [(doc, extract_blocks(doc)) for doc in COVERED]


@pytest.mark.timeout(1800)  # every block of a doc, one after the other, on a loaded machine
@pytest.mark.parametrize("doc,blocks", _cases(), ids=[d for d in COVERED])
def test_doc_blocks_run_as_shown(doc: str, blocks: list[Block], tmp_path: Path) -> None:
    """One doc per test: its blocks share one temp dir, in order, like a reader's shell."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    prepare(workdir)
    env = doc_env(workdir)
    failures, ran, skipped = [], 0, []
    for block in blocks:
        where = f"{doc}:{block.line}"
        reason = block.marker or _lookup(CANNOT_RUN, doc, first_command(block))
        if reason:
            skipped.append(f"{where} ({reason})")
            continue
        if block.setup:
            prep = run_shell(block.setup, workdir, env)
            if prep.returncode != 0:
                failures.append(f"{where}: setup `{block.setup}` failed: {prep.stderr[-500:]}")
                continue
        steps = [Step(block.text)] if block.lang != "console" else console_steps(block.text)
        for step in steps:
            why = _lookup(SKIP_COMMANDS, doc, step.command.strip())
            if why:
                skipped.append(f"{where} `{step.command}` ({why})")
                continue
            shows_error = any(e.startswith("Error:") for e in step.expected)
            want_code = step.exit_code if step.exit_code is not None else None
            for _attempt in range(1 + TIMING_RETRIES if _timed(step.command) else 1):
                done = run_shell(step.command, workdir, env)
                output = (done.stdout + done.stderr).splitlines()
                if want_code is not None:
                    ok_code = done.returncode == want_code
                else:
                    ok_code = (done.returncode != 0) if shows_error else done.returncode == 0
                if ok_code:
                    break
            ran += 1
            if not ok_code:
                failures.append(
                    f"{where}: `{step.command}` exited {done.returncode}\n"
                    + "\n".join(output[-15:])
                )
                continue
            missing = shown_matches(step.expected, output, workdir)
            if missing is not None:
                failures.append(
                    f"{where}: `{step.command}`: shown line not in the output: {missing!r}\n"
                    + "real output:\n"
                    + "\n".join(output[-20:])
                )
    print(f"{doc}: {ran} commands run; skipped: " + "; ".join(skipped))
    assert not failures, "\n\n".join(failures)
    # a doc whose every block needs hardware or a running daemon says why for each one
    assert ran > 0 or len(skipped) == len(blocks) > 0


def test_skip_tables_have_no_stale_entries() -> None:
    """Every entry in CANNOT_RUN and SKIP_COMMANDS still names a block of a covered doc."""
    known = set(CANNOT_RUN) | set(SKIP_COMMANDS)
    for doc in COVERED:
        for block in extract_blocks(doc):
            commands = [first_command(block)] + [s.command for s in console_steps(block.text)]
            known -= {
                (d, start)
                for d, start in known
                if d == doc and any(c.strip().startswith(start) for c in commands)
            }
    assert not known, f"CANNOT_RUN entries no block has any more: {sorted(known)}"


def test_placeholders() -> None:
    workdir = Path("/tmp/x")
    shown = ["release key b69788dbe118902f267bce7ea580ea1f73c07ceb3a2e516d6fa020a4ff7a2c11"]
    real = ["release key 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"]
    assert shown_matches(shown, real, workdir) is None
    assert (
        shown_matches(
            ["root expires 2027-11-23T13:00:00+00:00"],
            ["x", "root expires 2027-12-01T09:31:54+00:00"],
            workdir,
        )
        is None
    )
    assert (
        shown_matches(["published digits 1.1.0"], ["published digits 1.2.0"], workdir)
        == "published digits 1.1.0"
    )
    assert shown_matches(["a", "...", "c"], ["a", "b", "b", "c"], workdir) is None
    assert shown_matches(["c", "a"], ["a", "c"], workdir) == "a"  # order counts
    assert (
        shown_matches(
            ["  private: ... (mode 0600)"], ["  private: /tmp/x/keys/r.key (mode 0600)"], workdir
        )
        is None
    )
