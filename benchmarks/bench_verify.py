"""Benchmark: streaming package verification vs plain hashlib.sha256 over the same 200 MB file."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.package import build_keyring, verify_package, write_keyring
from agent.package.build import package_from_files, sign_package
from agent.package.keys import Keyring, PublicKey, SigningKey, keyid_of

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "agent" / "demo" / "models" / "digits_fp32.onnx"
PAYLOAD_MB = int(os.environ.get("BENCH_VERIFY_MB", "200"))
ROUNDS = 5
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with path.open("rb") as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


class PeakRSS:
    """Samples this process's RSS in a thread; reports the peak above the starting value."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / (1 << 20)


def make_package(work: Path) -> tuple[Path, Keyring]:
    private = Ed25519PrivateKey.generate()
    key = SigningKey(keyid_of(private.public_key()), private)
    keyring = build_keyring([PublicKey(key.keyid, "release", private.public_key())], {"release": 1})
    write_keyring(keyring, work / "keyring")
    payload = work / "weights.bin"
    with payload.open("wb") as fh:
        for _ in range(PAYLOAD_MB):
            fh.write(os.urandom(CHUNK))
    data = {
        "format": 1,
        "name": "bench",
        "version": "1.0.0",
        "release_counter": 1,
        "created": "2026-11-23T12:00:00Z",
        "task": "classification",
        "runtime": {"kind": "onnx", "precision": "fp32", "model": "model.onnx"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
    }
    pkg, _ = package_from_files(
        work / "bench.tar", data, {"model.onnx": MODEL, "weights.bin": payload}
    )
    payload.unlink()
    sign_package(pkg, key)
    return pkg, Keyring.load(work / "keyring")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        pkg, keyring = make_package(Path(tmp))
        size_mb = pkg.stat().st_size / (1 << 20)
        sha_times: list[float] = []
        ours_times: list[float] = []
        peak_extra_mb = 0.0
        for _ in range(ROUNDS):  # interleaved, so cache and CPU noise hit both alike
            t0 = time.perf_counter()
            sha256_file(pkg)
            sha_times.append(time.perf_counter() - t0)
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                verify_package(pkg, keyring)
                ours_times.append(time.perf_counter() - t0)
            peak_extra_mb = max(peak_extra_mb, rss.extra_mb)
        sha_best, ours_best = min(sha_times), min(ours_times)
        print(f"package_mb={size_mb:.1f}")
        print(f"sha256_mb_per_s={size_mb / sha_best:.1f}")
        print(f"verify_mb_per_s={size_mb / ours_best:.1f}")
        print(f"verify_peak_extra_rss_mb={peak_extra_mb:.1f}")
        print(f"verify_throughput_ratio={sha_best / ours_best:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
