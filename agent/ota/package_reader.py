"""Reading a package file into staging: the reader protocol, its default, its result."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class ExtractedPackage:
    """A package whose signatures, files and hashes were checked, extracted under staging/."""

    root: Path
    manifest: Mapping[str, Any]
    model_path: Path

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def release_counter(self) -> int:
        return int(self.manifest.get("release_counter", 0))


# Runs on the verified manifest (agent.package.Manifest) before any file is extracted.
ManifestCheck = Callable[[Any], None]


class PackageReader(Protocol):
    """Verify a package tar with the keyring, run ``check_manifest``, extract into staging."""

    def __call__(
        self,
        tar_path: Path,
        keyring_dir: Path,
        staging_dir: Path,
        check_manifest: ManifestCheck | None = None,
    ) -> ExtractedPackage: ...


def read_package_default(
    tar_path: Path,
    keyring_dir: Path,
    staging_dir: Path,
    check_manifest: ManifestCheck | None = None,
) -> ExtractedPackage:
    """Verify + extract with the package area's reader; ``check_manifest`` (compat, floor)
    runs on the verified manifest before any file data is written."""
    from agent.package import Keyring, read_package

    verified = read_package(
        tar_path, Keyring.load(keyring_dir), staging_dir, check_manifest=check_manifest
    )
    root = Path(verified.root)
    manifest = json.loads((root / "manifest.json").read_bytes())
    model = root / str(manifest.get("runtime", {}).get("model", "model.onnx"))
    return ExtractedPackage(root=root, manifest=manifest, model_path=model)
