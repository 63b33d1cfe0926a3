"""Ed25519 keys, key files, the device keyring, and threshold checks of manifest signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import ConfigError, ManifestError, SignatureError, UsageError
from agent.package.manifest import SIGNATURES_NAME, load_json_strict
from agent.textio import read_regular, write_atomic

ROLES = ("release", "rollout", "root", "targets", "snapshot", "timestamp")
KEYRING_NAME = "keyring.json"
MAX_SIGNATURES_BYTES = 64 << 10
MAX_SIGNATURES = 64
MAX_KEY_FILE_BYTES = 16 << 10
MAX_KEYRING_BYTES = 1 << 20
# Used with fullmatch: ``$`` alone would let a trailing newline through.
_KEYID_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_KEY_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", re.ASCII)


def keyid_of(public: Ed25519PublicKey) -> str:
    """Key id: sha256 hex of the raw 32-byte public key (docs/CONTRACTS.md)."""
    return hashlib.sha256(public_raw(public)).hexdigest()


def public_raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key with its id and role."""

    keyid: str
    role: str
    key: Ed25519PublicKey

    def to_dict(self) -> dict[str, str]:
        return {
            "keyid": self.keyid,
            "role": self.role,
            "keytype": "ed25519",
            "public": public_raw(self.key).hex(),
        }


@dataclass(frozen=True)
class SigningKey:
    """A private key loaded for signing, with its id and role (from the .pub.json beside it)."""

    keyid: str
    key: Ed25519PrivateKey

    def sign(self, data: bytes) -> dict[str, str]:
        """One signature entry for manifest.sig.json."""
        return {"keyid": self.keyid, "sig": base64.b64encode(self.key.sign(data)).decode()}


# ---------------------------------------------------------------------------------------
# Key files
# ---------------------------------------------------------------------------------------


def generate_key(
    role: str, out_dir: Path, name: str | None = None, passphrase: bytes | None = None
) -> tuple[Path, Path, str]:
    """Create ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub.json`` in ``out_dir``.

    Returns (private key path, public key path, key id). Never overwrites a key.
    """
    if role not in ROLES:
        raise UsageError(f"unknown key role {role!r} (choose from {', '.join(ROLES)})")
    name = name or role
    if not _KEY_NAME_RE.fullmatch(name):
        raise UsageError(f"key name {name!r}: use letters, digits and '._-'")
    key_path = out_dir / f"{name}.key"
    pub_path = out_dir / f"{name}.pub.json"
    for p in (key_path, pub_path):
        if p.exists():
            raise UsageError(f"{p}: already exists; keys are never overwritten (pick --name)")
    private = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public = PublicKey(keyid_of(private.public_key()), role, private.public_key())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(key_path, pem, mode=0o600)
        write_atomic(pub_path, (json.dumps(public.to_dict(), indent=2) + "\n").encode())
    except OSError as exc:
        raise UsageError(f"{out_dir}: cannot write key files ({exc.strerror})") from None
    return key_path, pub_path, public.keyid


def key_is_encrypted(path: Path) -> bool:
    return b"ENCRYPTED" in read_regular(path, MAX_KEY_FILE_BYTES, "key file")[:100]


def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Load an Ed25519 PKCS#8 PEM private key; one-line errors for every way it fails."""
    data = read_regular(path, MAX_KEY_FILE_BYTES, "key file")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        if passphrase:
            raise UsageError(f"{path}: key is not encrypted; drop the passphrase") from None
        raise UsageError(
            f"{path}: key is encrypted; give --passphrase-env VAR or run in a terminal"
        ) from None
    except ValueError as exc:
        reason = "wrong passphrase" if passphrase else "not a PEM private key"
        raise UsageError(f"{path}: cannot load key ({reason}: {_first_line(exc)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return SigningKey(keyid_of(key.public_key()), key)


def parse_public_key(data: Any, source: str) -> PublicKey:
    """Check a ``*.pub.json`` document; the key id must be the hash of the public key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    for k in ("keyid", "role", "keytype", "public"):
        if not isinstance(data.get(k), str):
            raise ConfigError(f"{source}: {k}: missing or not a string")
    if data["keytype"] != "ed25519":
        raise ConfigError(f"{source}: keytype: only 'ed25519' is supported")
    if data["role"] not in ROLES:
        raise ConfigError(f"{source}: role: {data['role']!r} is not one of {', '.join(ROLES)}")
    try:
        raw = bytes.fromhex(data["public"])
        key = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigError(f"{source}: public: expected 64 hex chars of an Ed25519 key") from None
    keyid = keyid_of(key)
    if data["keyid"] != keyid:
        raise ConfigError(f"{source}: keyid does not match the public key (expected {keyid})")
    return PublicKey(keyid, data["role"], key)


def load_public_key_file(path: Path) -> PublicKey:
    # One byte over the cap still reaches load_json_strict, which names the limit.
    raw = read_regular(path, MAX_KEY_FILE_BYTES + 1, "public key file", ConfigError)
    try:
        data = load_json_strict(raw, str(path), MAX_KEY_FILE_BYTES)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    return parse_public_key(data, str(path))


# ---------------------------------------------------------------------------------------
# Keyring
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleKeys:
    """The key ids trusted for one role and how many distinct ones must sign."""

    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class Keyring:
    """Trusted public keys per role, a threshold per role, and revoked key ids."""

    roles: Mapping[str, RoleKeys]
    keys: Mapping[str, PublicKey]
    revoked: frozenset[str] = frozenset()
    version: int = 1
    source: str = "<keyring>"

    @classmethod
    def load(cls, directory: Path) -> Keyring:
        """Read ``keyring.json`` and the ``*.pub.json`` files beside it."""
        path = directory / KEYRING_NAME
        # One byte over the cap still reaches load_json_strict, which names the limit.
        raw = read_regular(path, MAX_KEYRING_BYTES + 1, "keyring", ConfigError)
        keys: dict[str, PublicKey] = {}
        for pub in sorted(directory.glob("*.pub.json")):
            key = load_public_key_file(pub)
            keys[key.keyid] = key
        try:
            doc = load_json_strict(raw, str(path), MAX_KEYRING_BYTES)
        except ManifestError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(doc, keys, str(path))

    @classmethod
    def from_dict(cls, doc: Any, keys: Mapping[str, PublicKey], source: str) -> Keyring:
        if not isinstance(doc, dict) or not isinstance(doc.get("roles"), dict):
            raise ConfigError(f'{source}: expected {{"roles": {{...}}, "revoked": [...]}}')
        unknown = set(doc) - {"roles", "revoked", "version"}
        if unknown:
            raise ConfigError(f"{source}: unknown key {sorted(unknown)[0]!r}")
        version = doc.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"{source}: version: expected an integer >= 1")
        revoked_raw = doc.get("revoked", [])
        if not isinstance(revoked_raw, list) or not all(
            isinstance(k, str) and _KEYID_RE.fullmatch(k) for k in revoked_raw
        ):
            raise ConfigError(f"{source}: revoked: expected a list of 64-hex key ids")
        revoked = frozenset(revoked_raw)
        roles: dict[str, RoleKeys] = {}
        for role, spec in doc["roles"].items():
            where = f"{source}: roles.{role}"
            if role not in ROLES:
                raise ConfigError(f"{where}: unknown role (choose from {', '.join(ROLES)})")
            if not isinstance(spec, dict) or set(spec) != {"keyids", "threshold"}:
                raise ConfigError(f'{where}: expected {{"keyids": [...], "threshold": N}}')
            ids = spec["keyids"]
            if not isinstance(ids, list) or not all(isinstance(k, str) for k in ids):
                raise ConfigError(f"{where}.keyids: expected a list of key ids")
            for k in ids:
                if not _KEYID_RE.fullmatch(k):
                    raise ConfigError(f"{where}.keyids: {k!r} is not a 64-hex key id")
                if k not in keys:
                    raise ConfigError(f"{where}.keyids: no *.pub.json file for key {k[:16]}")
                if keys[k].role != role:
                    raise ConfigError(f"{where}.keyids: key {k[:16]} is a {keys[k].role} key")
            threshold = spec["threshold"]
            if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
                raise ConfigError(f"{where}.threshold: expected an integer >= 1")
            usable = len(set(ids) - revoked)
            if threshold > usable:
                raise ConfigError(
                    f"{where}.threshold: {threshold} but only {usable} unrevoked key(s) listed"
                )
            roles[role] = RoleKeys(tuple(dict.fromkeys(ids)), threshold)
        return cls(roles=roles, keys=dict(keys), revoked=revoked, version=version, source=source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "roles": {
                r: {"keyids": list(k.keyids), "threshold": k.threshold}
                for r, k in self.roles.items()
            },
            "revoked": sorted(self.revoked),
        }

    def role(self, role: str) -> RoleKeys:
        if role not in self.roles:
            raise SignatureError(f"{self.source}: no {role!r} role in the keyring")
        return self.roles[role]


def build_keyring(
    public_keys: Sequence[PublicKey],
    thresholds: Mapping[str, int],
    revoked: Sequence[str] = (),
    version: int = 1,
) -> Keyring:
    """Assemble a keyring from public keys (each goes to its own role) and thresholds."""
    keys = {k.keyid: k for k in public_keys}
    doc: dict[str, Any] = {"version": version, "roles": {}, "revoked": sorted(set(revoked))}
    for k in public_keys:
        role = doc["roles"].setdefault(k.role, {"keyids": [], "threshold": 1})
        if k.keyid not in role["keyids"]:
            role["keyids"].append(k.keyid)
    for role, n in thresholds.items():
        if role in doc["roles"]:
            doc["roles"][role]["threshold"] = n
        else:
            raise UsageError(f"threshold for role {role!r} given, but no {role} key was")
    try:
        return Keyring.from_dict(doc, keys, "<new keyring>")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def write_keyring(keyring: Keyring, directory: Path) -> Path:
    """Write ``<keyid>.pub.json`` for every key, then ``keyring.json`` last (the switch)."""
    directory.mkdir(parents=True, exist_ok=True)
    for key in keyring.keys.values():
        target = directory / f"{key.keyid[:16]}.pub.json"
        write_atomic(target, (json.dumps(key.to_dict(), indent=2) + "\n").encode())
    path = directory / KEYRING_NAME
    write_atomic(path, (json.dumps(keyring.to_dict(), indent=2) + "\n").encode())
    return path


# ---------------------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome of checking manifest.sig.json against one role of a keyring."""

    role: str
    threshold: int
    valid_keyids: tuple[str, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return len(self.valid_keyids) >= self.threshold

    def summary(self) -> str:
        text = (
            f"{len(self.valid_keyids)} valid {self.role} signature(s) of {self.threshold} required"
        )
        if self.problems:
            text += " (" + "; ".join(self.problems[:4]) + ")"
        return text


def parse_signatures(raw: bytes, source: str = SIGNATURES_NAME) -> list[dict[str, str]]:
    """Decode manifest.sig.json strictly; a broken file is a SignatureError."""
    try:
        doc = load_json_strict(raw, source, MAX_SIGNATURES_BYTES, max_depth=4)
    except ManifestError as exc:
        raise SignatureError(str(exc)) from None
    if (
        not isinstance(doc, dict)
        or set(doc) != {"signatures"}
        or not isinstance(doc["signatures"], list)
    ):
        raise SignatureError(f'{source}: expected {{"signatures": [{{"keyid", "sig"}}, ...]}}')
    sigs = doc["signatures"]
    if len(sigs) > MAX_SIGNATURES:
        raise SignatureError(
            f"{source}: {len(sigs)} signatures, more than {MAX_SIGNATURES} allowed"
        )
    for i, s in enumerate(sigs):
        if (
            not isinstance(s, dict)
            or set(s) != {"keyid", "sig"}
            or not isinstance(s["keyid"], str)
            or not isinstance(s["sig"], str)
        ):
            raise SignatureError(f'{source}: signatures[{i}]: expected {{"keyid", "sig"}} strings')
    return sigs


def signatures_bytes(sigs: Sequence[Mapping[str, str]]) -> bytes:
    return (json.dumps({"signatures": list(sigs)}, indent=2) + "\n").encode()


def check_signatures(
    manifest_raw: bytes, sigs: Sequence[Mapping[str, str]], keyring: Keyring, role: str = "release"
) -> SignatureCheck:
    """Count distinct, trusted, unrevoked keys of ``role`` whose signature fits the bytes."""
    spec = keyring.role(role)
    trusted = set(spec.keyids)
    valid: list[str] = []
    problems: list[str] = []
    for s in sigs:
        kid = s["keyid"]
        short = kid[:16]
        if kid in valid:
            problems.append(f"key {short} signed twice, counted once")
            continue
        if kid in keyring.revoked:
            problems.append(f"key {short} is revoked")
            continue
        if kid not in trusted:
            problems.append(f"key {short} is not a trusted {role} key")
            continue
        try:
            sig = base64.b64decode(s["sig"], validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"key {short}: signature is not base64")
            continue
        try:
            keyring.keys[kid].key.verify(sig, manifest_raw)
        except InvalidSignature:
            problems.append(f"key {short}: bad signature over manifest.json")
            continue
        valid.append(kid)
    return SignatureCheck(role, spec.threshold, tuple(valid), tuple(problems))


def require_threshold(
    manifest_raw: bytes, sig_raw: bytes, keyring: Keyring, role: str = "release"
) -> SignatureCheck:
    """Raise SignatureError unless a threshold of ``role`` keys signed the exact bytes."""
    result = check_signatures(manifest_raw, parse_signatures(sig_raw), keyring, role)
    if not result.passed:
        raise SignatureError(f"{SIGNATURES_NAME}: {result.summary()}")
    return result


def _first_line(exc: Exception, max_chars: int = 300) -> str:
    """The first line of a library's message, cut only between words: cryptography's
    "See https://cryptography.io/en/latest/faq/#..." link must stay whole to be useful."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[: cut if cut > 0 else max_chars] + " ..."
