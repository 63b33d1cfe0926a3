"""Key rotation and revocation: apply a keyring package signed by the current threshold."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.errors import ConfigError, DowngradeError, PackageError
from agent.package.keys import KEYRING_NAME, Keyring, load_public_key_file, write_keyring
from agent.package.manifest import Manifest
from agent.package.reader import Source, read_package


def _require_keyring_task(manifest: Manifest) -> None:
    if manifest.task != "keyring":
        raise PackageError(
            f"{manifest.package_id}: task is {manifest.task!r}, not a keyring update"
        )
    if KEYRING_NAME not in {f.path for f in manifest.files}:
        raise PackageError(f"{manifest.package_id}: carries no {KEYRING_NAME}")


def apply_keyring_update(pkg: Source, current_keyring_dir: Path) -> Keyring:
    """Verify ``pkg`` with the current keyring's release threshold and install its keyring.

    Refused when the new keyring is not newer (its ``version``), un-revokes a key, or has
    no release role. The switch is ``keyring.json`` replaced atomically after the new
    public key files are in place, so a crash leaves the old or the new keyring whole.
    """
    current_keyring_dir = Path(current_keyring_dir)
    current = Keyring.load(current_keyring_dir)
    staging = current_keyring_dir.parent / f".{current_keyring_dir.name}.update{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        read_package(pkg, current, staging, check_manifest=_require_keyring_task, check_model=False)
        try:
            new = Keyring.load(staging)
        except ConfigError as exc:
            raise PackageError(f"keyring update: {exc}") from None
        if new.version <= current.version:
            raise DowngradeError(
                f"keyring update: version {new.version} is not newer than the "
                f"installed {current.version}"
            )
        unrevoked = current.revoked - new.revoked
        if unrevoked:
            raise PackageError(
                f"keyring update: would un-revoke key {sorted(unrevoked)[0][:16]}, refused"
            )
        if "release" not in new.roles:
            raise PackageError("keyring update: the new keyring has no release role")
        write_keyring(new, current_keyring_dir)
        keep = set(new.keys)
        for pub in current_keyring_dir.glob("*.pub.json"):
            # Old keys' files go only after keyring.json stopped naming them.
            try:
                if load_public_key_file(pub).keyid not in keep:
                    pub.unlink()
            except (ConfigError, OSError):
                pub.unlink(missing_ok=True)
        return Keyring.load(current_keyring_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
