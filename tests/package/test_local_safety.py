"""Local file safety: atomic private writes, special paths refused unopened, whole regexes."""

# ruff: noqa: E501 - the pattern table reads best one case per line

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_yaml_file
from agent.errors import ConfigError, EdgeAgentError, ManifestError, UsageError
from agent.fleet.keys import generate_key_files
from agent.fleet.repo import check_channel_name, semver_key
from agent.fleet.tokens import add_device_token, revoke_device_token
from agent.ota.gate_data import load_golden_set
from agent.package import (
    Keyring,
    generate_key,
    load_signing_key,
    parse_manifest,
    parse_version,
    read_package,
    verify_package,
)
from agent.package.build import file_digest, read_head
from agent.runtime import load_backend
from agent.textio import PRIVATE_MODE, atomic_file, file_lock, load_npy, write_atomic

from .conftest import DIGITS_ONNX, REPO_ROOT, Forge

CLI = [sys.executable, "-m", "agent.cli"]
GOLDEN = REPO_ROOT / "golden_local"
# Only a hang would come near this; a refusal takes as long as starting Python.
HANG_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------------------
# Paths that are not regular files: refused with one error, before they are opened
# ---------------------------------------------------------------------------------------

# kind -> what the error calls it
KIND_NAMES = {
    "fifo": "FIFO",
    "directory": "directory",
    "device": "character device",
    "socket": "socket",
    "symlink-to-fifo": "FIFO",
}


@pytest.fixture()
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a unix socket's path must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="els-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def special_file(kind: str, path: Path) -> Iterator[Path]:
    """Put a FIFO, directory, device (a link to /dev/zero: reads never end), socket or a
    symlink to a FIFO at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock: socket.socket | None = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    elif kind == "symlink-to-fifo":
        os.mkfifo(path.with_name(path.name + ".fifo"))
        path.symlink_to(path.name + ".fifo")
    else:
        raise AssertionError(kind)
    try:
        yield path
    finally:
        if sock is not None:
            sock.close()


def _release_a_blocked_reader(path: Path) -> None:
    # A reader stuck in open() on a FIFO is let go when a writer appears.
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def call_without_hanging(fn: Callable[[], Any], path: Path) -> BaseException | None:
    """Run fn in a thread; fail the test (not hang it) if fn blocks on the path."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_TIMEOUT_S)
    if thread.is_alive():
        _release_a_blocked_reader(path)
        pytest.fail(f"blocked on {path} instead of refusing it")
    return outcome[0]


@dataclass(frozen=True)
class Env:
    work: Path
    keyring: Path
    x_npy: Path


@pytest.fixture()
def env(short_dir: Path, forge: Forge) -> Env:
    x = short_dir / "x.npy"
    shutil.copy(GOLDEN / "inputs.npy", x)
    return Env(short_dir, forge.keyring_dir, x)


def _golden_copy(work: Path) -> Path:
    """golden_local copied into work/golden (the row replaces one file with a special one)."""
    golden = work / "golden"
    if not golden.exists():
        shutil.copytree(GOLDEN, golden)
    return golden


@dataclass(frozen=True)
class CliRow:
    """A command whose input the attacker (or a mistake) replaced with a special path."""

    id: str
    place: str  # where the special file goes, relative to the work folder
    argv: Callable[[Path, Env], list[str]]


CLI_ROWS = [
    CliRow(
        "package-verify",
        "pkg.tar",
        lambda p, e: ["package", "verify", str(p), "--keyring", str(e.keyring)],
    ),
    CliRow("package-inspect", "pkg.tar", lambda p, e: ["package", "inspect", str(p)]),
    CliRow(
        "install",
        "pkg.tar",
        lambda p, e: ["install", str(p), "--state-dir", str(e.work / "state")],
    ),
    CliRow(
        "infer-model",
        "model.onnx",
        lambda p, e: ["infer", "--model", str(p), "--input", str(e.x_npy), "--output", "y.npy"],
    ),
    CliRow(
        "infer-model-no-suffix",
        "model",
        lambda p, e: ["infer", "--model", str(p), "--input", str(e.x_npy), "--output", "y.npy"],
    ),
    CliRow(
        "infer-input",
        "x-special.npy",
        lambda p, e: ["infer", "--model", str(DIGITS_ONNX), "--input", str(p), "--output", "y.npy"],
    ),
    CliRow(
        "gate-candidate",
        "cand.onnx",
        lambda p, e: [
            "gate",
            "--baseline",
            str(DIGITS_ONNX),
            "--candidate",
            str(p),
            "--golden",
            str(GOLDEN),
        ],
    ),
    CliRow(
        "gate-golden-inputs",
        "golden/inputs.npy",
        lambda p, e: [
            "gate",
            "--baseline",
            str(DIGITS_ONNX),
            "--candidate",
            str(DIGITS_ONNX),
            "--golden",
            str(p.parent),
        ],
    ),
    CliRow(
        "gate-policy",
        "policy.yaml",
        lambda p, e: [
            "gate",
            "--baseline",
            str(DIGITS_ONNX),
            "--candidate",
            str(DIGITS_ONNX),
            "--golden",
            str(GOLDEN),
            "--policy",
            str(p),
        ],
    ),
    CliRow(
        "package-sign-key",
        "release.key",
        lambda p, e: ["package", "sign", str(e.work / "pkg.tar"), "--key", str(p)],
    ),
]
# Every command gets a FIFO (the hang); two get every other kind too.
CLI_CASES = [(row, "fifo") for row in CLI_ROWS] + [
    (row, kind)
    for row in CLI_ROWS
    if row.id in ("package-verify", "infer-model")
    for kind in ("directory", "device", "socket", "symlink-to-fifo")
]


@pytest.mark.parametrize(
    ("row", "kind"), CLI_CASES, ids=[f"{row.id}-{kind}" for row, kind in CLI_CASES]
)
def test_cli_refuses_special_paths_before_opening_them(
    row: CliRow, kind: str, env: Env, forge: Forge
) -> None:
    if row.place.startswith("golden/"):
        _golden_copy(env.work)
        (env.work / row.place).unlink()
    if row.id == "package-sign-key":
        (env.work / "pkg.tar").write_bytes(forge.package())
    with special_file(kind, env.work / row.place) as path:
        try:
            proc = subprocess.run(
                [*CLI, *row.argv(path, env)],
                cwd=env.work,
                capture_output=True,
                text=True,
                timeout=HANG_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            _release_a_blocked_reader(path)
            pytest.fail(f"edge-agent {row.id} blocked on a {kind} instead of refusing it")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert f"is a {KIND_NAMES[kind]}, not a regular file" in lines[0], lines[0]
    assert str(path) in lines[0] or path.name in lines[0], lines[0]


@dataclass(frozen=True)
class ApiRow:
    """A shared open path of the agent, handed a special file instead of a regular one."""

    id: str
    place: str
    call: Callable[[Path, Env], Any]


API_ROWS = [
    ApiRow("verify_package", "pkg.tar", lambda p, e: verify_package(p, Keyring.load(e.keyring))),
    ApiRow(
        "read_package",
        "pkg.tar",
        lambda p, e: read_package(p, Keyring.load(e.keyring), e.work / "staging"),
    ),
    ApiRow("read_head (inspect, sign)", "pkg.tar", lambda p, e: read_head(p)),
    ApiRow("load_backend", "model.onnx", lambda p, e: load_backend(p)),
    ApiRow("load_backend-tflite", "model.tflite", lambda p, e: load_backend(p)),
    ApiRow("load_npy", "frame.npy", lambda p, e: load_npy(p)),
    ApiRow("load_golden_set", "golden/labels.npy", lambda p, e: load_golden_set(p.parent)),
    ApiRow("load_yaml_file", "agent.yaml", lambda p, e: load_yaml_file(p)),
    ApiRow("load_signing_key", "release.key", lambda p, e: load_signing_key(p)),
    ApiRow("Keyring.load", "keyring/keyring.json", lambda p, e: Keyring.load(p.parent)),
    ApiRow("file_digest (package build)", "model.onnx", lambda p, e: file_digest(p)),
]
API_CASES = [(row, kind) for row in API_ROWS for kind in KIND_NAMES]


@pytest.mark.parametrize(
    ("row", "kind"), API_CASES, ids=[f"{row.id}-{kind}" for row, kind in API_CASES]
)
def test_shared_open_paths_refuse_special_files(row: ApiRow, kind: str, env: Env) -> None:
    if row.place.startswith("golden/"):
        _golden_copy(env.work)
        (env.work / row.place).unlink()
    with special_file(kind, env.work / row.place) as path:
        error = call_without_hanging(lambda: row.call(path, env), path)
    assert isinstance(error, EdgeAgentError), repr(error)
    # A usage error (exit 2), whatever family the open path reports in.
    assert isinstance(error, UsageError) and error.exit_code == 2, repr(error)
    assert f"is a {KIND_NAMES[kind]}, not a regular file" in str(error), str(error)
    assert not (env.work / "staging").exists() or not any((env.work / "staging").iterdir())


# ---------------------------------------------------------------------------------------
# Atomic writes: mkstemp beside the target, private files 0600 from creation
# ---------------------------------------------------------------------------------------


def _old_temp_name(target: Path) -> Path:
    """The temp name write_atomic used to open with O_CREAT|O_TRUNC (guessable: our pid)."""
    return target.with_name(f".{target.name}.tmp{os.getpid()}")


@pytest.fixture()
def umask_zero() -> Iterator[None]:
    """umask 0, so a file's mode is what its creator asked for, nothing masked away."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@dataclass(frozen=True)
class PlantRow:
    id: str
    attacker_controls: str
    mode: int


PLANT_ROWS = [
    PlantRow(
        "symlink-at-the-guessable-temp-name",
        "a symlink at .<name>.tmp<pid> pointing at a file of theirs to overwrite",
        0o644,
    ),
    PlantRow(
        "world-readable-file-at-the-guessable-temp-name",
        "a 0666 file at .<name>.tmp<pid> that a private key would be written into",
        PRIVATE_MODE,
    ),
    PlantRow(
        "target-is-a-symlink",
        "the target path itself is a symlink to a file of theirs",
        PRIVATE_MODE,
    ),
]


@pytest.mark.parametrize("row", PLANT_ROWS, ids=[r.id for r in PLANT_ROWS])
def test_write_atomic_never_writes_through_planted_files(
    row: PlantRow, tmp_path: Path, umask_zero: None
) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim's own bytes")
    target = folder / "release.key"
    planted = _old_temp_name(target)
    if row.id.startswith("symlink"):
        planted.symlink_to(victim)
    elif row.id.startswith("world-readable"):
        planted.write_bytes(b"")
        planted.chmod(0o666)
    else:
        target.symlink_to(victim)
    write_atomic(target, b"SECRET", mode=row.mode)
    assert victim.read_bytes() == b"victim's own bytes", row.attacker_controls
    assert not target.is_symlink() and target.read_bytes() == b"SECRET"
    assert stat.S_IMODE(target.lstat().st_mode) == row.mode, row.attacker_controls
    if planted.is_symlink() or planted.exists():
        assert b"SECRET" not in (planted.read_bytes() if not planted.is_symlink() else b"")
    leftovers = {p.name for p in folder.iterdir()} - {target.name, planted.name}
    assert not leftovers, leftovers


@pytest.mark.parametrize("mode", [PRIVATE_MODE, 0o644, 0o640], ids=oct)
def test_atomic_file_has_its_final_mode_before_the_first_byte(
    mode: int, tmp_path: Path, umask_zero: None
) -> None:
    target = tmp_path / "out.json"
    with atomic_file(target, mode) as fh:
        temps = [p for p in tmp_path.iterdir() if p.name != target.name]
        # In the target's folder (same filesystem, so os.replace is a rename), hidden.
        assert len(temps) == 1 and temps[0].name.startswith(".out.json.")
        assert stat.S_IMODE(os.fstat(fh.fileno()).st_mode) == mode
        assert stat.S_IMODE(temps[0].stat().st_mode) == mode
        fh.write(b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@dataclass(frozen=True)
class SecretWriterRow:
    """A writer of a private file; the attacker planted a 0666 file at its old temp name."""

    id: str
    secret_name: str
    write: Callable[[Path], None]


def _package_key(folder: Path) -> None:
    generate_key("release", folder, "rel-1")


def _fleet_key(folder: Path) -> None:
    generate_key_files(folder, "ts", "timestamp")


def _token_add(folder: Path) -> None:
    add_device_token(folder / "tokens.json", "pi-1")


def _token_revoke(folder: Path) -> None:
    revoke_device_token(folder / "tokens.json", "pi-1")


SECRET_WRITERS = [
    SecretWriterRow("package-key", "rel-1.key", _package_key),
    SecretWriterRow("fleet-key", "ts.key", _fleet_key),
    SecretWriterRow("token-add", "tokens.json", _token_add),
    SecretWriterRow("token-revoke", "tokens.json", _token_revoke),
]


@pytest.mark.parametrize("row", SECRET_WRITERS, ids=[r.id for r in SECRET_WRITERS])
def test_private_files_are_0600_from_creation(
    row: SecretWriterRow, tmp_path: Path, umask_zero: None
) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir()
    if row.id == "token-revoke":
        add_device_token(folder / "tokens.json", "pi-1")
        add_device_token(folder / "tokens.json", "pi-2")
    planted = _old_temp_name(folder / row.secret_name)
    planted.write_bytes(b"")
    planted.chmod(0o666)
    row.write(folder)
    secret = folder / row.secret_name
    assert stat.S_IMODE(secret.stat().st_mode) == PRIVATE_MODE
    assert planted.read_bytes() == b"", "the secret went into the attacker's file"
    for pub in folder.glob("*.pub.json"):
        assert stat.S_IMODE(pub.stat().st_mode) == 0o644


def test_keys_generate_command_writes_a_0600_key_under_umask_zero(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*CLI, "keys", "generate", "--role", "rollout", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
        preexec_fn=lambda: os.umask(0),
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "rollout.key").stat().st_mode) == PRIVATE_MODE
    assert stat.S_IMODE((tmp_path / "rollout.pub.json").stat().st_mode) == 0o644


@dataclass(frozen=True)
class FaultRow:
    id: str
    fault: str


FAULT_ROWS = [
    FaultRow("exception-mid-write", "the writer raises after half the bytes"),
    FaultRow("disk-full", "a 2 MiB tmpfs fills up during the write"),
    FaultRow("sigkill-mid-write", "the writing process is SIGKILLed after half the bytes"),
]

WRITER = """
import sys, time
from pathlib import Path
from agent.textio import atomic_file
with atomic_file(Path(sys.argv[1]), 0o600) as fh:
    fh.write(b"new half")
    fh.flush()
    print("written", flush=True)
    time.sleep(3600)
"""


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("row", FAULT_ROWS, ids=[r.id for r in FAULT_ROWS])
def test_a_failed_write_leaves_the_old_file(row: FaultRow, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(small_tmpfs(tmp_path)) if row.id == "disk-full" else tmp_path
        target = folder / "state.json"
        write_atomic(target, b"old content", mode=PRIVATE_MODE)
        if row.id == "exception-mid-write":
            with pytest.raises(RuntimeError), atomic_file(target, PRIVATE_MODE) as fh:
                fh.write(b"new half")
                raise RuntimeError("the writer fails")
        elif row.id == "disk-full":
            with pytest.raises(OSError) as info:
                write_atomic(target, b"x" * (3 << 20), mode=PRIVATE_MODE)
            assert info.value.errno == 28, info.value  # ENOSPC
        else:
            proc = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
            )
            try:
                assert proc.stdout is not None and proc.stdout.readline() == "written\n"
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(HANG_TIMEOUT_S)
        assert target.read_bytes() == b"old content", row.fault
        assert stat.S_IMODE(target.stat().st_mode) == PRIVATE_MODE
        leftovers = [p.name for p in folder.iterdir() if p.name != target.name]
        if row.id == "sigkill-mid-write":
            # A killed writer leaves its hidden temp file (nothing can remove it), which
            # never stands in the way of the next write.
            assert all(n.startswith(".state.json.") for n in leftovers), leftovers
        else:
            assert leftovers == [], leftovers
        write_atomic(target, b"next content", mode=PRIVATE_MODE)
        assert target.read_bytes() == b"next content"


# ---------------------------------------------------------------------------------------
# Validating patterns match the whole string (fullmatch, ASCII digits only)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatternRow:
    id: str
    check: Callable[[Forge], Any]
    error: type[EdgeAgentError]
    message: str


def _manifest_with(forge: Forge, **overrides: Any) -> Any:
    return parse_manifest(json.dumps(forge.manifest(**overrides)).encode())


def _manifest_edit(forge: Forge, edit: Callable[[dict[str, Any]], None]) -> Any:
    doc = forge.manifest()
    edit(doc)
    return parse_manifest(json.dumps(doc).encode())


def _keyring_with(forge: Forge, edit: Callable[[dict[str, Any]], None]) -> Keyring:
    doc = forge.keyring.to_dict()
    edit(doc)
    return Keyring.from_dict(doc, forge.keyring.keys, "keyring.json")


ARABIC_INDIC_3 = "\u0663"

PATTERN_ROWS = [
    PatternRow("name-trailing-newline", lambda f: _manifest_with(f, name="digits\n"), ManifestError, "name: 'digits\\n' does not match"),
    PatternRow("version-trailing-newline", lambda f: parse_version("1.1.0\n"), ManifestError, "not a semantic version"),
    PatternRow("version-other-script-digit", lambda f: parse_version(f"1.{ARABIC_INDIC_3}.0"), ManifestError, "not a semantic version"),
    PatternRow("manifest-version-newline", lambda f: _manifest_with(f, version="1.1.0\n"), ManifestError, "not a semantic version"),
    PatternRow("created-trailing-newline", lambda f: _manifest_with(f, created="2026-11-23T12:00:00Z\n"), ManifestError, "created"),
    PatternRow("created-other-script-digits", lambda f: _manifest_with(f, created=f"2026-11-2{ARABIC_INDIC_3}T12:00:00Z"), ManifestError, "created"),
    PatternRow("sha256-trailing-newline", lambda f: _manifest_edit(f, lambda d: d["files"][0].update(sha256=d["files"][0]["sha256"] + "\n")), ManifestError, "sha256"),
    PatternRow("runtime-feature-newline", lambda f: _manifest_edit(f, lambda d: d["compat"].update(runtime_features=["onnx\n"])), ManifestError, "runtime_features[0]"),
    PatternRow("hardware-class-newline", lambda f: _manifest_edit(f, lambda d: d["compat"].update(hardware_classes=["jetson\n"])), ManifestError, "hardware_classes[0]"),
    PatternRow("key-name-newline", lambda f: generate_key("release", Path("/nonexistent"), "rel-1\n"), UsageError, "key name"),
    # A revocation that would silently not match the key it names (the set holds "<id>\n").
    PatternRow("revoked-keyid-newline", lambda f: _keyring_with(f, lambda d: d.update(revoked=[d["revoked"][0] + "\n"])), ConfigError, "revoked"),
    PatternRow("channel-name-newline", lambda f: check_channel_name("stable\n"), UsageError, "channel name 'stable\\n'"),
    PatternRow("repo-version-newline", lambda f: semver_key("1.1.0\n"), ManifestError, "not a semantic version"),
    PatternRow("repo-version-other-script-digit", lambda f: semver_key(f"1.{ARABIC_INDIC_3}.0"), ManifestError, "not a semantic version"),
    PatternRow("role-keyid-newline", lambda f: _keyring_with(f, lambda d: d["roles"]["release"]["keyids"].__setitem__(0, d["roles"]["release"]["keyids"][0] + "\n")), ConfigError, "is not a 64-hex key id"),
]  # fmt: skip


@pytest.mark.parametrize("row", PATTERN_ROWS, ids=[r.id for r in PATTERN_ROWS])
def test_validating_patterns_match_the_whole_string(row: PatternRow, forge: Forge) -> None:
    with pytest.raises(row.error) as info:
        row.check(forge)
    assert row.message in str(info.value)


def test_the_same_values_without_the_trailing_newline_pass(forge: Forge) -> None:
    """The table above refuses only the extra character, not the value."""
    assert _manifest_with(forge, name="digits", version="1.1.0").name == "digits"
    assert str(parse_version("1.3.0")) == "1.3.0"
    assert check_channel_name("stable") == "stable"
    assert semver_key("1.2.0-rc.1") < semver_key("1.2.0") < semver_key("1.10.0")
    assert forge.keyring.revoked  # the keyring the rows edit does revoke a key


def test_file_lock_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    elsewhere = tmp_path / "elsewhere"
    lock.symlink_to(elsewhere)
    with pytest.raises(OSError) as info, file_lock(lock):
        pass
    assert info.value.errno == errno.ELOOP
    assert not elsewhere.exists()


def test_download_does_not_write_through_a_planted_part_link(tmp_path: Path) -> None:
    """staging/<file>.part replaced by a link to a file elsewhere: the download refuses to
    write through it, and the file it points at is untouched."""
    import hashlib
    import http.server

    from agent.errors import OTAError
    from agent.ota.download import TargetRef, download_target
    from agent.ota.fetch import HttpFetcher

    payload = b"x" * 4096

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        staging = tmp_path / "staging"
        staging.mkdir()
        victim = tmp_path / "victim.bin"
        victim.write_bytes(b"KEEP")
        (staging / "pkg.tar.part").symlink_to(victim)
        ref = TargetRef(
            url=f"http://127.0.0.1:{server.server_port}/pkg.tar",
            length=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            filename="pkg.tar",
        )
        with pytest.raises(OTAError, match="symbolic link"):
            download_target(HttpFetcher(), ref, staging)
        assert victim.read_bytes() == b"KEEP"
    finally:
        server.shutdown()
        server.server_close()
