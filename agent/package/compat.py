"""Does a verified manifest fit this device: agent version, hardware class, runtimes."""

from __future__ import annotations

from collections.abc import Collection

from agent.errors import CompatibilityError
from agent.package.manifest import Manifest
from agent.package.semver import parse_version

# Which installed backend (agent.runtime.installed_runtimes) serves a runtime kind or feature.
FEATURE_BACKENDS = {
    "onnx": ("onnx", "tensorrt"),
    "tflite": ("litert",),
    "litert": ("litert",),
    "tensorrt": ("tensorrt",),
}


def check_compat(
    manifest: Manifest, agent_version: str, hardware_class: str, runtimes: Collection[str]
) -> None:
    """Raise CompatibilityError with the first reason the package cannot run here."""
    pkg = manifest.package_id
    need = parse_version(manifest.compat.min_agent_version, "compat.min_agent_version")
    have = parse_version(agent_version, "agent version")
    if have < need:
        raise CompatibilityError(f"{pkg}: needs edge-agent >= {need}, this agent is {have}")
    classes = manifest.compat.hardware_classes
    if classes and hardware_class not in classes:
        raise CompatibilityError(
            f"{pkg}: built for hardware class {', '.join(classes)}, "
            f"this device is {hardware_class!r}"
        )
    wanted = list(manifest.compat.runtime_features)
    if manifest.runtime is not None and manifest.runtime.kind not in wanted:
        wanted.insert(0, manifest.runtime.kind)
    have_runtimes = set(runtimes)
    for feature in wanted:
        backends = FEATURE_BACKENDS.get(feature, (feature,))
        if not have_runtimes.intersection(backends):
            raise CompatibilityError(
                f"{pkg}: needs runtime feature {feature!r}, this device has "
                f"{', '.join(sorted(have_runtimes)) or 'none'}"
            )
