"""Per-device bearer tokens for telemetry upload; the file keeps only their sha256."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from pathlib import Path

from agent.errors import ConfigError, UsageError
from agent.textio import write_atomic

MAX_TOKENS_FILE_BYTES = 16 << 20


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, str]:
    """sha256(token) -> device_id from a tokens file ({"devices": {device_id: sha256}})."""
    try:
        if path.stat().st_size > MAX_TOKENS_FILE_BYTES:
            raise ConfigError(f"{path}: tokens file is larger than {MAX_TOKENS_FILE_BYTES} bytes")
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: tokens file not found (create one with token add)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable tokens file ({exc})") from None
    devices = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(devices, dict):
        raise ConfigError(f'{path}: expected {{"devices": {{device_id: sha256}}}}')
    out: dict[str, str] = {}
    for device_id, digest in devices.items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise ConfigError(f"{path}: devices.{device_id}: expected a sha256 hex digest")
        out[digest] = device_id
    return out


def device_for_token(tokens: Mapping[str, str], token: str) -> str | None:
    """The device a bearer token belongs to.

    Looking up the token's sha256 (not the token) keeps the lookup's timing independent of
    the secret: an attacker cannot steer a hash prefix toward a stored digest.
    """
    return tokens.get(token_digest(token))


def _read_devices(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {device: digest for digest, device in load_tokens(path).items()}


def add_device_token(path: Path, device_id: str) -> str:
    """Create (or replace) a device's token; returns the token, which is shown only once."""
    if not device_id or len(device_id) > 128 or not device_id.isprintable():
        raise UsageError(f"device id {device_id!r}: use 1-128 printable characters")
    devices = _read_devices(path)
    token = secrets.token_urlsafe(32)
    devices[device_id] = token_digest(token)
    write_atomic(path, json.dumps({"devices": devices}, indent=2, sort_keys=True).encode(), 0o600)
    return token


def revoke_device_token(path: Path, device_id: str) -> None:
    devices = _read_devices(path)
    if device_id not in devices:
        raise UsageError(f"device {device_id!r} has no token in {path}")
    del devices[device_id]
    write_atomic(path, json.dumps({"devices": devices}, indent=2, sort_keys=True).encode(), 0o600)
