"""CLI consistency and progress: real subprocesses, a 20 MB package, closed pipes, help text."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.progress import MIN_BYTES, Progress

CLI = [sys.executable, "-m", "agent.cli"]
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "agent" / "demo" / "models" / "digits_fp32.onnx"
SCHEMA = """\
name: digits
version: 1.1.0
release_counter: 2
runtime: {kind: onnx, precision: fp32}
preprocess: {resize: [8, 8], layout: NCHW, color_order: GRAY, scale: 0.0625}
"""
BIG_BYTES = 20 << 20
TENTHS = re.compile(r"^(?P<label>[\w .-]+): +(?P<pct>\d+)% \(.*\)$")


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd
    )


# ---------------------------------------------------------------------------------------
# The Progress helper itself (a fake clock: no test depends on wall-clock speed)
# ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_one_line_per_tenth_when_not_a_tty() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress("download x.tar", 100 << 20, stream=out, enabled=True, clock=clock) as bar:
        for _ in range(40):
            clock.now += 0.5
            bar.advance(5 << 19)  # 2.5 MB per step: tenths fall between steps
    lines = out.getvalue().splitlines()
    assert [int(TENTHS.match(line).group("pct")) for line in lines] == list(range(10, 101, 10))  # type: ignore[union-attr]
    assert "10.0 MB of 100.0 MB, 5.0 MB/s, ETA 18 s" in lines[0]
    assert "ETA" not in lines[-1]


def test_progress_redraws_in_place_on_a_tty_and_ends_the_line() -> None:
    clock, out = FakeClock(), TtyStream()
    with Progress("verify x.tar", 10 << 20, stream=out, enabled=True, clock=clock) as bar:
        for _ in range(10):
            clock.now += 1.0
            bar.advance(1 << 20)
    text = out.getvalue()
    assert text.count("\r") == 10 and text.endswith("\n") and text.count("\n") == 1
    assert "verify x.tar: 100% (10.0 MB of 10.0 MB, 1.0 MB/s)" in text


@pytest.mark.parametrize(
    "enabled,total,expect_output",
    [(False, 100 << 20, False), (True, MIN_BYTES - 1, False), (True, MIN_BYTES, True)],
    ids=["quiet", "small-work", "long-work"],
)
def test_progress_is_silent_when_off_or_short(
    enabled: bool, total: int, expect_output: bool
) -> None:
    out = io.StringIO()
    with Progress("x", total, stream=out, enabled=enabled) as bar:
        bar.advance(total)
    assert bool(out.getvalue()) is expect_output


# ---------------------------------------------------------------------------------------
# Real subprocesses on a 20 MB package
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A signed package with a 20 MB extra file, made with the CLI: (work, tar, keyring)."""
    work = tmp_path_factory.mktemp("big")
    (work / "schema.yaml").write_text(SCHEMA)
    (work / "big.bin").write_bytes(os.urandom(BIG_BYTES))
    for i in (1, 2):
        out = run("keys", "generate", "--role", "release", "--name", f"r{i}", "--out", work / "k")
        assert out.returncode == 0, out.stderr
    out = run(
        "keys", "keyring", "--out", work / "keyring", "--threshold", "2",
        work / "k" / "r1.pub.json", work / "k" / "r2.pub.json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    build = run(
        "package", "build", "--model", DIGITS, "--schema", work / "schema.yaml",
        "--out", work / "dist", "--file", f"big.bin={work / 'big.bin'}",
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    lines = build.stderr.splitlines()
    for label in ("hash big.bin", "write big.bin"):
        pcts = [int(m.group("pct")) for m in map(TENTHS.match, lines) if m and m["label"] == label]
        assert pcts == list(range(10, 101, 10)), (label, build.stderr)
    tar = work / "dist" / "digits-1.1.0.tar"
    for i in (1, 2):
        assert run("package", "sign", tar, "--key", work / "k" / f"r{i}.key").returncode == 0
    return work, tar, work / "keyring"


@dataclass(frozen=True)
class QuietCase:
    id: str
    args: tuple[str, ...]  # where the flag sits decides nothing: both places work
    progress_lines: int


QUIET_CASES = [
    QuietCase("default", (), 10),
    QuietCase("q-before-subcommand", ("-q",), 0),
    QuietCase("q-after-subcommand", ("AFTER", "-q"), 0),
    QuietCase("quiet-after-subcommand", ("AFTER", "--quiet"), 0),
]


@pytest.mark.parametrize("case", QUIET_CASES, ids=lambda c: c.id)
def test_verify_shows_progress_unless_quiet(
    big_package: tuple[Path, Path, Path], case: QuietCase
) -> None:
    _, tar, keyring = big_package
    command = ["package", "verify", str(tar), "--keyring", str(keyring)]
    before = [a for a in case.args if a != "AFTER"] if "AFTER" not in case.args else []
    after = [a for a in case.args if a != "AFTER"] if "AFTER" in case.args else []
    out = run(*before, *command, *after)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK digits-1.1.0")
    lines = [m for m in map(TENTHS.match, out.stderr.splitlines()) if m]
    assert len(lines) == case.progress_lines, out.stderr
    assert all(m["label"] == "verify digits-1.1.0.tar" for m in lines)


def test_debug_after_the_subcommand_is_accepted(tmp_path: Path) -> None:
    plain = run("package", "inspect", tmp_path / "missing.tar")
    assert plain.returncode == 2 and plain.stderr.startswith("Error: ")
    assert "Traceback" not in plain.stderr
    out = run("package", "inspect", tmp_path / "missing.tar", "--debug")
    assert out.returncode == 2 and "Traceback" in out.stderr  # --debug took effect
    assert out.stderr.splitlines()[-1].startswith("Error: ")


def test_telemetry_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: like `| head -0`
    try:
        proc = subprocess.run(
            [*CLI, "telemetry", "status", "--state-dir", str(tmp_path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_bad_key_keeps_the_cryptography_faq_url_whole(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_text("not a key\n")
    out = run("package", "sign", tmp_path / "x.tar", "--key", tmp_path / "bad.key")
    assert out.returncode == 2
    url = re.search(r"https://\S+", out.stderr)
    assert (
        url
        and url.group(0) == "https://cryptography.io/en/latest/faq/#why-can-t-i-import-my-pem-file"
    )


# ---------------------------------------------------------------------------------------
# Help text: one metavar style, every option explained, defaults shown
# ---------------------------------------------------------------------------------------


def _walk(parser: argparse.ArgumentParser, prog: str) -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.append((prog, action))
            for name, sub in action.choices.items():
                out += _walk(sub, f"{prog} {name}")
        else:
            out.append((prog, action))
    return out


def test_every_option_has_help_and_shows_its_default() -> None:
    from agent.cli import build_parser

    actions = _walk(build_parser(), "edge-agent")
    groups = {a.metavar for _, a in actions if isinstance(a, argparse._SubParsersAction)}
    assert groups == {"COMMAND"}
    missing, no_default = [], []
    for prog, a in actions:
        if isinstance(
            a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
        ):
            continue
        if a.help == argparse.SUPPRESS:  # hidden test hooks (doctor's --sysfs-root, ...)
            continue
        name = a.option_strings[0] if a.option_strings else a.dest
        if not a.help:
            missing.append(f"{prog} {name}")
            continue
        trivial = a.default in (None, False, [], argparse.SUPPRESS) or isinstance(
            a, argparse._StoreTrueAction
        )
        if a.option_strings and not trivial and "default" not in a.help:
            no_default.append(f"{prog} {name} (default {a.default!r})")
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"help that hides the default: {no_default}"
