"""Load the operator's Ed25519 key files (CONTRACTS.md format) as TUF keys and signers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# securesystemslib re-exports these without __all__, which mypy --strict flags.
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

from agent.errors import ConfigError

# Passphrase-protected .key files are opened with this environment variable (never argv).
PASSPHRASE_ENV = "EDGE_AGENT_KEY_PASSPHRASE"
MAX_KEY_FILE_BYTES = 64 << 10
ROLES = ("root", "targets", "snapshot", "timestamp", "release", "rollout")


@dataclass(frozen=True)
class OperatorKey:
    """One key: its public half as a TUF key, and a signer when the private file is present."""

    keyid: str
    role: str
    public_hex: str
    pub_path: Path
    signer: CryptoSigner | None
    expires: datetime | None

    @property
    def tuf_key(self) -> SSlibKey:
        return tuf_key_from_hex(self.public_hex, self.keyid)


def keyid_for(public_raw: bytes) -> str:
    """Key id per CONTRACTS.md: sha256 hex of the raw 32-byte Ed25519 public key."""
    import hashlib

    return hashlib.sha256(public_raw).hexdigest()


def tuf_key_from_hex(public_hex: str, keyid: str | None = None) -> SSlibKey:
    raw = bytes.fromhex(public_hex)
    return SSlibKey(
        keyid=keyid or keyid_for(raw),
        keytype="ed25519",
        scheme="ed25519",
        keyval={"public": public_hex},
    )


def _read_small(path: Path) -> bytes:
    # Imported here: textio brings numpy, which the fleet commands do not otherwise need.
    from agent.textio import read_regular

    return read_regular(path, MAX_KEY_FILE_BYTES, "key file", ConfigError)


def _parse_expires(value: object, where: Path) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: 'expires' must be an ISO 8601 time string")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{where}: 'expires' is not an ISO 8601 time ({value!r})") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def load_public(pub_path: Path) -> OperatorKey:
    """Read a `<name>.pub.json` file (and `<name>.key` beside it when it exists)."""
    try:
        doc = json.loads(_read_small(pub_path))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{pub_path}: not a JSON public key file") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{pub_path}: expected a JSON object")
    public_hex = doc.get("public")
    role = doc.get("role")
    if doc.get("keytype", "ed25519") != "ed25519":
        raise ConfigError(f"{pub_path}: keytype {doc.get('keytype')!r} is not ed25519")
    if not isinstance(public_hex, str) or len(public_hex) != 64:
        raise ConfigError(f"{pub_path}: 'public' must be 64 hex characters")
    try:
        raw = bytes.fromhex(public_hex)
    except ValueError:
        raise ConfigError(f"{pub_path}: 'public' is not hex") from None
    if role not in ROLES:
        raise ConfigError(f"{pub_path}: role {role!r} is not one of {', '.join(ROLES)}")
    keyid = keyid_for(raw)
    if doc.get("keyid", keyid) != keyid:
        raise ConfigError(f"{pub_path}: keyid does not match the public key")
    key_path = pub_path.with_name(pub_path.name[: -len(".pub.json")] + ".key")
    signer = _load_signer(key_path, public_hex, keyid) if key_path.exists() else None
    return OperatorKey(
        keyid=keyid,
        role=str(role),
        public_hex=public_hex,
        pub_path=pub_path,
        signer=signer,
        expires=_parse_expires(doc.get("expires"), pub_path),
    )


def _load_signer(key_path: Path, public_hex: str, keyid: str) -> CryptoSigner:
    pem = _read_small(key_path)
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        private = serialization.load_pem_private_key(
            pem, password=passphrase.encode() if passphrase else None
        )
    except TypeError:
        raise ConfigError(f"{key_path}: key is encrypted; set {PASSPHRASE_ENV}") from None
    except ValueError:
        raise ConfigError(f"{key_path}: not an Ed25519 PEM key or wrong passphrase") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{key_path}: not an Ed25519 private key")
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if raw.hex() != public_hex:
        raise ConfigError(f"{key_path}: private key does not match its .pub.json")
    return CryptoSigner(private, tuf_key_from_hex(public_hex, keyid))


def load_key_dir(key_dir: Path) -> list[OperatorKey]:
    """Every `*.pub.json` in a folder, with signers where the private file sits beside it."""
    if not key_dir.is_dir():
        raise ConfigError(f"{key_dir}: key folder not found")
    keys = [load_public(p) for p in sorted(key_dir.glob("*.pub.json"))]
    if not keys:
        raise ConfigError(f"{key_dir}: no *.pub.json key files")
    return keys


def keys_for_role(keys: Iterable[OperatorKey], role: str) -> list[OperatorKey]:
    return [k for k in keys if k.role == role]


def signers_for_role(keys: Iterable[OperatorKey], role: str) -> list[CryptoSigner]:
    return [k.signer for k in keys if k.role == role and k.signer is not None]


def generate_key_files(out_dir: Path, name: str, role: str) -> OperatorKey:
    """Write a fresh key pair in the CONTRACTS.md format (for tests and the benchmark)."""
    from agent.textio import write_atomic

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public: Ed25519PublicKey = private.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = {"keyid": keyid_for(raw), "role": role, "keytype": "ed25519", "public": raw.hex()}
    write_atomic(out_dir / f"{name}.key", pem, mode=0o600)
    write_atomic(out_dir / f"{name}.pub.json", json.dumps(doc, indent=2).encode() + b"\n")
    return load_public(out_dir / f"{name}.pub.json")
