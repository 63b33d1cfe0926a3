"""Signed model packages: manifest, keys, build, sign, safe reading, compat, anti-downgrade."""

from __future__ import annotations

from agent.package.compat import check_compat
from agent.package.floor import ReleaseFloor
from agent.package.keyring_update import apply_keyring_update
from agent.package.keys import (
    Keyring,
    PublicKey,
    SigningKey,
    build_keyring,
    generate_key,
    keyid_of,
    load_public_key_file,
    load_signing_key,
    write_keyring,
)
from agent.package.manifest import FileEntry, Manifest, parse_manifest
from agent.package.reader import (
    ReadLimits,
    VerifiedPackage,
    load_installed,
    read_package,
    verify_package,
)
from agent.package.semver import Version, parse_version

__all__ = [
    "FileEntry",
    "Keyring",
    "Manifest",
    "PublicKey",
    "ReadLimits",
    "ReleaseFloor",
    "SigningKey",
    "VerifiedPackage",
    "Version",
    "apply_keyring_update",
    "build_keyring",
    "check_compat",
    "generate_key",
    "keyid_of",
    "load_installed",
    "load_public_key_file",
    "load_signing_key",
    "parse_manifest",
    "parse_version",
    "read_package",
    "verify_package",
    "write_keyring",
]
