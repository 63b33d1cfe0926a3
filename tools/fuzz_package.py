"""Atheris fuzz target for the package reader and the manifest parser.

Short run (CI):  python tools/fuzz_package.py -runs=2000
Long run:        python tools/fuzz_package.py -max_total_time=3600 -max_len=65536 corpus_dir/
Any exception other than the agent's own PackageError/ManifestError family is a finding.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from agent.errors import PackageError, StateError
    from agent.package.keys import PublicKey, SigningKey, build_keyring, keyid_of, signatures_bytes
    from agent.package.manifest import parse_manifest
    from agent.package.reader import read_package, verify_package
    from agent.package.tarstream import END_OF_ARCHIVE, padding, tar_header

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_PRIVATE = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz").digest())
KEY = SigningKey(keyid_of(_PRIVATE.public_key()), _PRIVATE)
KEYRING = build_keyring([PublicKey(KEY.keyid, "release", _PRIVATE.public_key())], {"release": 1})
WORK = Path(tempfile.mkdtemp(prefix="fuzz-package-"))


def _member(name: str, data: bytes) -> bytes:
    return tar_header(name, len(data)) + data + padding(len(data))


def _signed_package(manifest_raw: bytes, body: bytes) -> bytes:
    """A correctly signed head followed by fuzzed bytes, so the fuzzer gets past the trust check."""
    sig = signatures_bytes([KEY.sign(manifest_raw)])
    return _member("manifest.json", manifest_raw) + _member("manifest.sig.json", sig) + body


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    rest = fdp.ConsumeBytes(len(data))
    try:
        if mode == 0:
            parse_manifest(rest)
        elif mode == 1:
            verify_package(io.BytesIO(rest), KEYRING)
        else:
            cut = len(rest) // 2
            manifest_raw = rest[:cut]
            if mode == 3:
                # A valid-looking manifest listing one file, so extraction paths are reached.
                digest = hashlib.sha256(rest[cut:]).hexdigest()
                entry = {"path": "a.bin", "sha256": digest, "size": len(rest) - cut}
                doc = {
                    "format": 1,
                    "name": "f",
                    "version": "1.0.0",
                    "release_counter": 1,
                    "created": "2026-01-01T00:00:00Z",
                    "task": "keyring",
                    "files": [entry],
                }
                manifest_raw = json.dumps(doc).encode()
                body = _member("a.bin", rest[cut:]) + END_OF_ARCHIVE
            else:
                body = rest[cut:]
            staging = WORK / "staging"
            try:
                read_package(
                    io.BytesIO(_signed_package(manifest_raw, body)), KEYRING, staging, fsync=False
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (PackageError, StateError):
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
