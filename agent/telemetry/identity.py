"""Device and boot identity for telemetry rows: a hashed device id and the kernel boot id."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

MACHINE_ID_PATH = Path("/etc/machine-id")
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# The raw machine id is a secret per systemd's machine-id(5); only a keyed hash leaves the box.
_DEVICE_ID_CONTEXT = b"edge-agent device-id v1:"


def derive_device_id(machine_id_path: Path = MACHINE_ID_PATH) -> str | None:
    """sha256-derived id from /etc/machine-id (never the raw id); None when unreadable."""
    try:
        raw = machine_id_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not raw:
        return None
    return hashlib.sha256(_DEVICE_ID_CONTEXT + raw.encode("ascii")).hexdigest()[:32]


def resolve_device_id(
    configured: str | None,
    state_dir: Path | None = None,
    machine_id_path: Path = MACHINE_ID_PATH,
) -> str:
    """The configured id, else the provisioned state_dir/device_id, else a machine-id hash."""
    if configured:
        return configured
    if state_dir is not None:
        try:
            provisioned = (state_dir / "device_id").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            provisioned = ""
        if provisioned:
            return provisioned
    derived = derive_device_id(machine_id_path)
    return derived if derived else "unknown-device"


def read_boot_id(boot_id_path: Path = BOOT_ID_PATH) -> str:
    """The kernel's boot id; a random one per process when /proc is not there (not Linux)."""
    try:
        text = boot_id_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    # A fresh random id still keeps (device_id, boot_id, seq) unique; it only makes one
    # boot look like several to the server, which is the safe direction.
    return text or f"nobootid-{uuid.uuid4()}"
