"""Shared helpers for the OTA tests: keys, signed packages, a provisioned state dir, a TUF repo."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import io
import json
import shutil
import socketserver
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from onnx import numpy_helper

from agent.config import AgentConfig, OTAConfig
from agent.fleet.keys import OperatorKey, generate_key_files, load_key_dir
from agent.fleet.repo import RepoExpiry, init_repo, publish_package, write_channel
from agent.ota.service import OTAService

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "agent" / "demo" / "models"
GOLDEN = REPO / "golden_local"


def make_key_dir(out: Path, release_keys: int = 1) -> list[OperatorKey]:
    """Operator keys: root, targets, snapshot, timestamp, rollout, release-N."""
    out.mkdir(parents=True, exist_ok=True)
    for role in ("root", "targets", "snapshot", "timestamp", "rollout"):
        generate_key_files(out, role, role)
    for i in range(1, release_keys + 1):
        generate_key_files(out, f"release-{i}", "release")
    return load_key_dir(out)


def _sign(manifest_bytes: bytes, keys: Sequence[OperatorKey]) -> bytes:
    sigs = []
    for key in keys:
        pem = key.pub_path.with_name(key.pub_path.name[: -len(".pub.json")] + ".key").read_bytes()
        private: Any = serialization.load_pem_private_key(pem, password=None)
        sigs.append(
            {"keyid": key.keyid, "sig": base64.b64encode(private.sign(manifest_bytes)).decode()}
        )
    return json.dumps({"signatures": sigs}).encode()


def build_package(
    out_dir: Path,
    keys: Sequence[OperatorKey],
    version: str,
    release_counter: int,
    model_bytes: bytes,
    precision: str = "fp32",
    name: str = "digits",
    compat: dict[str, Any] | None = None,
    preprocess: dict[str, Any] | None = None,
) -> Path:
    """A package tar as CONTRACTS.md lays it out, signed by ``keys`` (``preprocess`` keys
    override the digits model's)."""
    manifest = {
        "format": 1,
        "name": name,
        "version": version,
        "release_counter": release_counter,
        "created": "2026-11-23T12:00:00Z",
        "task": "classification",
        "runtime": {"kind": "onnx", "precision": precision, "model": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "preprocess": {
            "resize": [8, 8],
            "layout": "NCHW",
            "color_order": "GRAY",
            "mean": [0.0],
            "std": [1.0],
            # the source's uint8 frames to the golden set's 0..1 (what the demo's schema
            # says): on frames 255 times too bright the FP32 and INT8 models disagree,
            # and the probation shadow rightly rolls the INT8 one back
            "scale": 1.0 / 255.0,
            **(preprocess or {}),
        },
        "labels": [str(i) for i in range(10)],
        "compat": compat
        or {"min_agent_version": "0.1.0", "hardware_classes": [], "runtime_features": []},
        "files": [
            {
                "path": "model.onnx",
                "sha256": hashlib.sha256(model_bytes).hexdigest(),
                "size": len(model_bytes),
            }
        ],
    }
    raw = json.dumps(manifest, indent=2).encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{version}.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in (
            ("manifest.json", raw),
            ("manifest.sig.json", _sign(raw, keys)),
            ("model.onnx", model_bytes),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def broken_digits_model(seed: int = 0) -> bytes:
    """The demo digits model with its output weights scrambled: loads fine, fails the gate."""
    model = onnx.load(str(DEMO / "digits_fp32.onnx"))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name == "w2":
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(rng.permutation(arr.T).T.copy(), "w2"))
    return model.SerializeToString()


@dataclasses.dataclass
class Device:
    """A provisioned state dir, its config and the operator keys that sign for it."""

    root: Path
    state_dir: Path
    keys: list[OperatorKey]
    config: AgentConfig
    packages: Path

    def service(self, **kwargs: Any) -> OTAService:
        return OTAService(self.config, **kwargs)

    def package(
        self,
        version: str,
        counter: int,
        model: str | bytes = "digits_fp32.onnx",
        keys: Sequence[OperatorKey] | None = None,
        precision: str = "fp32",
        compat: dict[str, Any] | None = None,
        preprocess: dict[str, Any] | None = None,
    ) -> Path:
        data = model if isinstance(model, bytes) else (DEMO / model).read_bytes()
        signers = keys if keys is not None else [k for k in self.keys if k.role == "release"]
        return build_package(
            self.packages,
            signers,
            version,
            counter,
            data,
            precision,
            compat=compat,
            preprocess=preprocess,
        )


def in_process_gate(dev: Device) -> Any:
    """The gate's own code run in this process instead of its child (gate_process.py), for
    tests that run hundreds of gates and are about the journal, not the gate's isolation."""
    from agent.ota.gate_process import GateRequest, run_gate_here

    def gate(baseline: Path, candidate: Path, manifest: Any) -> Any:
        golden = dev.config.ota.golden_dir
        assert golden is not None
        cache = dev.state_dir / "gate-cache"
        return run_gate_here(
            GateRequest(baseline, candidate, manifest, golden, cache, dev.config.model, 0.0)
        )

    return gate


def write_keyring(keys: Sequence[OperatorKey], out: Path) -> Path:
    """The device keyring (package area's format) trusting the release keys."""
    pkg_keys: Any = __import__("agent.package.keys", fromlist=["x"])
    out.mkdir(parents=True, exist_ok=True)
    release = [k for k in keys if k.role == "release"]
    for k in release:
        shutil.copy(k.pub_path, out / k.pub_path.name)
    publics = [pkg_keys.load_public_key_file(out / k.pub_path.name) for k in release]
    keyring = pkg_keys.build_keyring(publics, {"release": 1})
    pkg_keys.write_keyring(keyring, out)
    return out


def make_device(tmp: Path, repository_url: str | None = None, **ota: Any) -> Device:
    keys = make_key_dir(tmp / "operator")
    state = tmp / "state"
    (state / "keyring").mkdir(parents=True)
    write_keyring(keys, state / "keyring")
    (state / "device_id").write_text("test-device-1\n")
    golden = tmp / "golden"
    shutil.copytree(GOLDEN, golden)
    # Latency on 2 busy shared cores is noise; the gate's latency check is tested elsewhere.
    policy = (
        (golden / "policy.yaml")
        .read_text()
        .replace("latency_p95_slack_ms: 0.5", "latency_p95_slack_ms: 1000")
    )
    (golden / "policy.yaml").write_text(policy)
    ota_cfg = OTAConfig(
        enabled=True,
        repository_url=repository_url,
        golden_dir=golden,
        probation_frames=20,
        probation_s=0.0,
        reserve_free_bytes=0,
        **ota,
    )
    cfg = AgentConfig(device_id="test-device-1", state_dir=state, ota=ota_cfg)
    return Device(tmp, state, keys, cfg, tmp / "packages")


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return make_device(tmp_path)


def release_floor(dev: Device, name: str = "digits") -> int | None:
    """The device's committed release_counter floor (the package area's ReleaseFloor)."""
    from agent.package import ReleaseFloor

    with ReleaseFloor(dev.state_dir / "state.db") as floor:
        return floor.get(name)


def feed_frames(service: OTAService, frames: int, confidence: float = 0.9) -> None:
    """Drive probation with frames run through the live model on golden inputs."""
    from agent.ota import install

    pkg_dir = install.resolve(service.state_dir, "current")
    assert pkg_dir is not None
    manifest = json.loads((pkg_dir / "manifest.json").read_bytes())
    backend = service.load_model(pkg_dir, manifest)
    x = np.load(GOLDEN / "inputs.npy")[:frames].astype(np.float32)
    for row in x:
        logits = backend.run(row[None])[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        service.observe_frame(0.001, float(p.max()) if confidence > 0 else None)


# ------------------------------------------------------------------ a TUF repository


def channel_doc(
    version: str, counter: int, percent: float = 100.0, salt: str = "s1", **extra: Any
) -> dict[str, Any]:
    """A channel document (CONTRACTS.md) naming digits ``version``."""
    doc = {
        "channel": "stable",
        "package": "digits",
        "release": {
            "version": version,
            "target": f"packages/digits-{version}.tar",
            "release_counter": counter,
        },
        "rollout": {
            "percent": percent,
            "salt": salt,
            "stage": 0,
            "paused": False,
            "aborted": False,
        },
        "revert_versions": [],
        "updated": "2026-11-23T12:00:00Z",
    }
    doc.update(extra)
    return doc


def repo_device(tmp_path: Path, url: str, www: Path, **expiry: float) -> Device:
    """A device provisioned with the root of a fresh TUF repository in ``www``."""
    dev = make_device(tmp_path, repository_url=url)
    init_repo(www, dev.keys, expiry=RepoExpiry(**expiry) if expiry else None)
    roots = sorted((www / "metadata").glob("*root.json"))
    (dev.state_dir / "tuf").mkdir()
    shutil.copy(roots[0], dev.state_dir / "tuf" / "root.json")
    return dev


def publish_release(
    dev: Device,
    www: Path,
    version: str,
    counter: int,
    model: str = "digits_fp32.onnx",
    precision: str = "fp32",
    **channel: Any,
) -> None:
    """Build, publish and point the stable channel at ``version``."""
    tar = dev.package(version, counter, model, precision=precision)
    publish_package(www, tar, dev.keys)
    write_channel(www, channel_doc(version, counter, **channel), dev.keys)


# ------------------------------------------------------------------ a static HTTP server


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with Range support; ``faults`` lets a test cut or corrupt replies."""

    faults: ClassVar[dict[str, Any]] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.directory) / self.path.lstrip("/").split("?")[0]
        self.faults.setdefault("requests", []).append((self.path, self.headers.get("Range")))
        on_get = self.faults.get("on_get")
        if on_get is not None:
            on_get(self.path)  # a test's hook: e.g. fill the device's disk at this request
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        fault = self.faults.get("targets") if "/targets/packages/" in self.path else None
        if fault == "wrong":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        rng = self.headers.get("Range")
        ignore_range = fault == "no_range" or self.faults.get("ignore_range")
        if rng and rng.startswith("bytes=") and not ignore_range:
            start = int(rng[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "cut" and self.faults.get("cuts", 0) > 0:
            self.faults["cuts"] -= 1
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if fault == "drip":
            import time

            for b in body[:50]:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.wfile.write(body)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (url, folder, faults)."""
    www = tmp_path / "www"
    www.mkdir()
    faults: dict[str, Any] = {}
    handler: Callable[..., Any] = lambda *a, **k: type(  # noqa: E731
        "H", (_Handler,), {"faults": faults}
    )(*a, directory=str(www), **k)
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www, faults
    server.shutdown()
    server.server_close()
