"""Bearer tokens: per-device upload tokens and operator read tokens; the file keeps only sha256."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def load_operator_tokens(path: Path) -> dict[str, str]:
    """sha256(token) -> operator name from the same file's "operators" section.

    Kept apart from the device tokens: a device token never reads the fleet page and an
    operator token never writes telemetry.
    """
    load_tokens(path)  # the same size, JSON and shape checks
    operators = json.loads(path.read_bytes()).get("operators", {})
    if not isinstance(operators, dict):
        raise ConfigError(f'{path}: expected "operators": {{name: sha256}}')
    out: dict[str, str] = {}
    for name, digest in operators.items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise ConfigError(f"{path}: operators.{name}: expected a sha256 hex digest")
        out[digest] = name
    return out


def _read_operators(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {name: digest for digest, name in load_operator_tokens(path).items()}


def _write_tokens(path: Path, devices: Mapping[str, str], operators: Mapping[str, str]) -> None:
    doc: dict[str, Any] = {"devices": dict(devices)}
    if operators:
        doc["operators"] = dict(operators)
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True).encode(), 0o600)


def _check_name(what: str, name: str) -> None:
    if not name or len(name) > 128 or not name.isprintable():
        raise UsageError(f"{what} {name!r}: use 1-128 printable characters")


def add_operator_token(path: Path, name: str) -> str:
    """Create (or replace) an operator's read token for the fleet page; shown only once."""
    _check_name("operator name", name)
    devices, operators = _read_devices(path), _read_operators(path)
    token = secrets.token_urlsafe(32)
    operators[name] = token_digest(token)
    _write_tokens(path, devices, operators)
    return token


def revoke_operator_token(path: Path, name: str) -> None:
    devices, operators = _read_devices(path), _read_operators(path)
    if name not in operators:
        raise UsageError(f"operator {name!r} has no token in {path}")
    del operators[name]
    _write_tokens(path, devices, operators)


def add_device_token(path: Path, device_id: str) -> str:
    """Create (or replace) a device's token; returns the token, which is shown only once."""
    _check_name("device id", device_id)
    devices, operators = _read_devices(path), _read_operators(path)
    token = secrets.token_urlsafe(32)
    devices[device_id] = token_digest(token)
    _write_tokens(path, devices, operators)
    return token


def revoke_device_token(path: Path, device_id: str) -> None:
    devices, operators = _read_devices(path), _read_operators(path)
    if device_id not in devices:
        raise UsageError(f"device {device_id!r} has no token in {path}")
    del devices[device_id]
    _write_tokens(path, devices, operators)
