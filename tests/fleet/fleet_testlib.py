"""Fleet test helpers: operator key folders, signed packages, a static server, device checks."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from agent.fleet.keys import OperatorKey, generate_key_files, load_key_dir

DEMO_MODEL = Path(__file__).resolve().parents[2] / "agent" / "demo" / "models" / "digits_fp32.onnx"


def make_key_dir(out: Path, release_keys: int = 2) -> list[OperatorKey]:
    """A full operator key folder: root, targets, snapshot, timestamp, rollout, release-N."""
    for role in ("root", "targets", "snapshot", "timestamp", "rollout"):
        generate_key_files(out, role, role)
    for i in range(1, release_keys + 1):
        generate_key_files(out, f"release-{i}", "release")
    return load_key_dir(out)


def _private_pem(key: OperatorKey) -> bytes:
    return key.pub_path.with_name(key.pub_path.name[: -len(".pub.json")] + ".key").read_bytes()


def sign_manifest(manifest_bytes: bytes, signing_keys: Sequence[OperatorKey]) -> bytes:
    sigs = []
    for key in signing_keys:
        private = serialization.load_pem_private_key(_private_pem(key), password=None)
        sig = private.sign(manifest_bytes)  # type: ignore[call-arg, union-attr, arg-type]
        sigs.append({"keyid": key.keyid, "sig": base64.b64encode(sig).decode()})
    return json.dumps({"signatures": sigs}).encode()


def build_package(
    out_dir: Path,
    signing_keys: Sequence[OperatorKey],
    name: str = "digits",
    version: str = "1.0.0",
    release_counter: int = 1,
    model_bytes: bytes | None = None,
) -> Path:
    """A package tar laid out as CONTRACTS.md says, signed by the given release keys."""
    model = model_bytes if model_bytes is not None else DEMO_MODEL.read_bytes()
    manifest = {
        "format": 1,
        "name": name,
        "version": version,
        "release_counter": release_counter,
        "created": "2026-11-23T12:00:00Z",
        "task": "classification",
        "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "labels": [str(i) for i in range(10)],
        "compat": {"min_agent_version": "0.1.0", "hardware_classes": [], "runtime_features": []},
        "files": [
            {"path": "model.onnx", "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}
        ],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{version}.tar"
    with tarfile.open(path, "w") as tar:
        for member, data in (
            ("manifest.json", manifest_bytes),
            ("manifest.sig.json", sign_manifest(manifest_bytes, signing_keys)),
            ("model.onnx", model),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tree_digest(base: Path) -> dict[str, str]:
    """Every file under base with its sha256, to show a refused operation changed nothing."""
    return {
        str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def static_server(folder: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving folder (a plain static host, like a CDN)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def provision_device(state_dir: Path, repo_dir: Path, root_version: int = 1) -> None:
    """What `edge-agent provision` leaves behind for TUF: the trusted root."""
    (state_dir / "tuf").mkdir(parents=True, exist_ok=True)
    shutil.copy(
        repo_dir / "metadata" / f"{root_version}.root.json", state_dir / "tuf" / "root.json"
    )


def device_fetch_channel(state_dir: Path, url: str, channel: str = "stable") -> Any:
    """The real OTA client's channel check (agent.ota.channel.ChannelClient)."""
    from agent.ota.channel import ChannelClient
    from agent.ota.journal import Journal

    journal = Journal(state_dir / "state.db")
    try:
        return ChannelClient(state_dir, url, journal).fetch_channel(channel)
    finally:
        journal.close()


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """The FastAPI app under a real uvicorn server on 127.0.0.1 (random port), in a thread."""
    import socket
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def ota_record(
    device_id: str,
    seq: int,
    state: str,
    version: str,
    time_ns: int,
    boot_id: str = "boot-1",
    from_version: str = "1.0.0",
    package: str = "digits",
) -> Any:
    """One ota.state row as the device's telemetry store keeps it (agent.telemetry)."""
    from agent.telemetry.store import StoredRecord

    attrs = {
        "state": state,
        "package": package,
        "version": version,
        "from_version": from_version,
        "reason": "",
        "channel": "stable",
    }
    return StoredRecord(
        id=seq,
        device_id=device_id,
        boot_id=boot_id,
        seq=seq,
        type="event",
        priority=2,
        name="ota.state",
        time_unix_ns=time_ns,
        observed_unix_ns=time_ns,
        clock_ok=True,
        attrs=attrs,
        size_bytes=100,
    )
