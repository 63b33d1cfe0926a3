"""Helpers for package tests: fixed test keys, a keyring, and a forge for raw (hostile) tars."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.package.keys import (
    Keyring,
    PublicKey,
    SigningKey,
    build_keyring,
    keyid_of,
    signatures_bytes,
    write_keyring,
)
from agent.package.tarstream import END_OF_ARCHIVE, padding, tar_header

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS_ONNX = REPO_ROOT / "agent" / "demo" / "models" / "digits_fp32.onnx"


def fixed_key(label: str) -> SigningKey:
    """A deterministic Ed25519 key, so test packages are the same on every run."""
    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())
    return SigningKey(keyid_of(private.public_key()), private)


def public_of(key: SigningKey, role: str) -> PublicKey:
    return PublicKey(key.keyid, role, key.key.public_key())


@dataclass
class Member:
    """One raw tar member as the forge writes it (header fields can lie about the data)."""

    name: str
    data: bytes = b""
    typeflag: bytes = b"0"
    header_size: int | None = None
    linkname: str = ""

    def to_bytes(self) -> bytes:
        size = len(self.data) if self.header_size is None else self.header_size
        return tar_header(self.name, size, self.typeflag, linkname=self.linkname) + (
            self.data + padding(len(self.data))
        )


@dataclass
class Forge:
    """Builds well-formed and hostile packages as raw bytes."""

    keys: dict[str, SigningKey] = field(repr=False)
    keyring_dir: Path
    files: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def keyring(self) -> Keyring:
        return Keyring.load(self.keyring_dir)

    def manifest(self, files: dict[str, bytes] | None = None, **overrides: Any) -> dict[str, Any]:
        files = self.files if files is None else files
        doc: dict[str, Any] = {
            "format": 1,
            "name": "digits",
            "version": "1.1.0",
            "release_counter": 3,
            "created": "2026-11-23T12:00:00Z",
            "task": "classification",
            "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
            "inputs": [
                {
                    "name": "input",
                    "dtype": "float32",
                    "shape": [None, 1, 8, 8],
                    "quantization": None,
                }
            ],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": [None, 10], "quantization": None}
            ],
            "labels": [str(i) for i in range(10)],
            "compat": {
                "min_agent_version": "0.1.0",
                "hardware_classes": [],
                "runtime_features": ["onnx"],
            },
            "files": [
                {"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                for p, d in sorted(files.items())
            ],
        }
        doc.update(overrides)
        return doc

    def sign(self, manifest_raw: bytes, signers: tuple[str, ...] = ("r1", "r2")) -> bytes:
        return signatures_bytes([self.keys[s].sign(manifest_raw) for s in signers])

    def package(
        self,
        *,
        files: dict[str, bytes] | None = None,
        manifest: dict[str, Any] | None = None,
        manifest_raw: bytes | None = None,
        signers: tuple[str, ...] = ("r1", "r2"),
        sig_raw: bytes | None = None,
        members: list[Member] | None = None,
        edit_members: Callable[[list[Member]], list[Member]] | None = None,
        tail: bytes = END_OF_ARCHIVE,
    ) -> bytes:
        files = self.files if files is None else files
        if manifest_raw is None:
            doc = manifest if manifest is not None else self.manifest(files)
            manifest_raw = (json.dumps(doc, indent=2) + "\n").encode()
        if sig_raw is None:
            sig_raw = self.sign(manifest_raw, signers)
        if members is None:
            members = [
                Member("manifest.json", manifest_raw),
                Member("manifest.sig.json", sig_raw),
                *(Member(p, d) for p, d in sorted(files.items())),
            ]
        if edit_members is not None:
            members = edit_members(members)
        return b"".join(m.to_bytes() for m in members) + tail


@pytest.fixture(scope="session")
def test_keys() -> dict[str, SigningKey]:
    """r1-r3: trusted release keys; rv: release key that is revoked; x1: untrusted; ro1: rollout."""
    return {k: fixed_key(f"edge-agent-test-{k}") for k in ("r1", "r2", "r3", "rv", "x1", "ro1")}


def make_keyring(keys: dict[str, SigningKey], directory: Path, threshold: int = 2) -> Path:
    pubs = [public_of(keys[k], "release") for k in ("r1", "r2", "r3", "rv")]
    pubs.append(public_of(keys["ro1"], "rollout"))
    keyring = build_keyring(pubs, {"release": threshold, "rollout": 1}, revoked=[keys["rv"].keyid])
    write_keyring(keyring, directory)
    return directory


@pytest.fixture(scope="session")
def forge(tmp_path_factory: pytest.TempPathFactory, test_keys: dict[str, SigningKey]) -> Forge:
    directory = make_keyring(test_keys, tmp_path_factory.mktemp("keyring") / "keyring")
    files = {
        "model.onnx": DIGITS_ONNX.read_bytes(),
        "labels.txt": "".join(f"{i}\n" for i in range(10)).encode(),
    }
    return Forge(keys=test_keys, keyring_dir=directory, files=files)


def npy_bytes(arr: Any, allow_pickle: bool = False) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def tree_snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under root: kind, mode and content hash (to prove nothing changed)."""
    out: dict[str, tuple[str, int, str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", st.st_mode, str(p.readlink()))
        elif p.is_dir():
            out[str(p.relative_to(root))] = ("dir", st.st_mode, "")
        else:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = ("file", st.st_mode, digest)
    return out
