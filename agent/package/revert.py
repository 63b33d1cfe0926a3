"""Revert authorisations: a release-threshold-signed permission to go below the release floor."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.errors import DowngradeError, ManifestError, SignatureError, UsageError
from agent.package.keys import Keyring, SigningKey, check_signatures, parse_signatures
from agent.package.manifest import load_json_strict
from agent.package.semver import parse_version
from agent.textio import write_atomic

REVERT_TYPE = "edge-agent-revert"
REVERT_SUFFIX = ".revert.json"
MAX_REVERT_BYTES = 64 << 10
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RevertAuthorisation:
    """The release keys allow installing ``package`` ``version`` (``release_counter``) on a
    device whose floor for ``package`` is at most ``max_floor``.

    ``max_floor`` bounds the permission: once the fleet has moved on past it (a newer
    release committed), replaying the same document cannot pull devices back again.
    """

    package: str
    version: str
    release_counter: int
    max_floor: int
    created: str = ""

    def body(self) -> dict[str, Any]:
        return {
            "type": REVERT_TYPE,
            "package": self.package,
            "version": self.version,
            "release_counter": self.release_counter,
            "max_floor": self.max_floor,
            "created": self.created,
        }

    def signed_bytes(self) -> bytes:
        """The exact bytes the release keys sign (canonical JSON of ``body()``)."""
        return json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    def allows(self, package: str, version: str, release_counter: int, floor: int) -> bool:
        return (package, version, release_counter) == (
            self.package,
            self.version,
            self.release_counter,
        ) and floor <= self.max_floor

    def check(self, package: str, version: str, release_counter: int, floor: int) -> None:
        """DowngradeError naming why this document does not cover that install."""
        if (package, version) != (self.package, self.version):
            raise DowngradeError(
                f"revert authorisation is for {self.package} {self.version}, "
                f"not {package} {version}"
            )
        if release_counter != self.release_counter:
            raise DowngradeError(
                f"revert authorisation names release_counter {self.release_counter}, "
                f"the package has {release_counter}"
            )
        if floor > self.max_floor:
            raise DowngradeError(
                f"revert authorisation for {package} {version} covers floors up to "
                f"{self.max_floor}; this device's floor is {floor}"
            )


def revert_target(package: str, version: str) -> str:
    """The TUF target path of a revert authorisation (under the release role's packages/*)."""
    return f"packages/{package}-{version}{REVERT_SUFFIX}"


def new_revert(
    package: str, version: str, release_counter: int, max_floor: int
) -> RevertAuthorisation:
    """A fresh, unsigned authorisation; UsageError for values that cannot be right."""
    if not _NAME_RE.fullmatch(package):
        raise UsageError(f"package name {package!r}: use a-z, 0-9, '.', '_' or '-'")
    try:
        parse_version(version, "--version")
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    if release_counter < 0 or max_floor < 0:
        raise UsageError("release_counter and max_floor must not be negative")
    if max_floor <= release_counter:
        raise UsageError(
            f"--max-floor {max_floor} must be above --release-counter {release_counter} "
            "(a revert goes below a floor)"
        )
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return RevertAuthorisation(package, version, release_counter, max_floor, created)


def revert_bytes(auth: RevertAuthorisation, signatures: Sequence[dict[str, str]]) -> bytes:
    """The file published as the TUF target: the body and its detached signatures."""
    doc = {"revert": auth.body(), "signatures": list(signatures)}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def parse_revert(data: bytes, source: str) -> tuple[RevertAuthorisation, list[dict[str, str]]]:
    """Parse a revert file strictly; SignatureError for anything malformed."""
    try:
        doc = load_json_strict(data, source, MAX_REVERT_BYTES, max_depth=4)
    except ManifestError as exc:
        raise SignatureError(f"{source}: not a revert authorisation ({exc})") from None
    if not isinstance(doc, dict) or set(doc) != {"revert", "signatures"}:
        raise SignatureError(f'{source}: expected {{"revert": {{...}}, "signatures": [...]}}')
    body = doc["revert"]
    fields = {"type", "package", "version", "release_counter", "max_floor", "created"}
    if not isinstance(body, dict) or set(body) != fields or body["type"] != REVERT_TYPE:
        raise SignatureError(f"{source}: revert: expected the fields {sorted(fields)}")
    for key in ("package", "version", "created"):
        if not isinstance(body[key], str):
            raise SignatureError(f"{source}: revert.{key} must be a string")
    for key in ("release_counter", "max_floor"):
        value = body[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SignatureError(f"{source}: revert.{key} must be a non-negative integer")
    auth = RevertAuthorisation(
        body["package"],
        body["version"],
        body["release_counter"],
        body["max_floor"],
        body["created"],
    )
    sigs = parse_signatures(json.dumps({"signatures": doc["signatures"]}).encode(), source)
    return auth, sigs


def verify_revert(data: bytes, keyring: Keyring, source: str) -> RevertAuthorisation:
    """The authorisation, once a threshold of the keyring's release keys signed it."""
    auth, sigs = parse_revert(data, source)
    result = check_signatures(auth.signed_bytes(), sigs, keyring, "release")
    if not result.passed:
        raise SignatureError(f"{source}: {result.summary()}")
    return auth


def sign_revert_file(
    path: Path,
    key: SigningKey,
    package: str | None = None,
    version: str | None = None,
    release_counter: int | None = None,
    max_floor: int | None = None,
) -> tuple[RevertAuthorisation, int]:
    """Add ``key``'s signature to the revert file at ``path``, creating it from the given
    fields when it does not exist yet; returns the document and its signature count."""
    if path.exists():
        auth, sigs = parse_revert(path.read_bytes(), str(path))
        given = (package, version, release_counter, max_floor)
        have = (auth.package, auth.version, auth.release_counter, auth.max_floor)
        if any(g is not None and g != h for g, h in zip(given, have, strict=True)):
            raise UsageError(f"{path}: already holds a revert for {have}, not {given}")
    else:
        if package is None or version is None or release_counter is None or max_floor is None:
            raise UsageError(
                f"{path}: no such revert file; give --package, --version, --release-counter "
                "and --max-floor to create it"
            )
        auth, sigs = new_revert(package, version, release_counter, max_floor), []
    sigs = [s for s in sigs if s["keyid"] != key.keyid]
    sigs.append(key.sign(auth.signed_bytes()))
    write_atomic(path, revert_bytes(auth, sigs))
    return auth, len(sigs)
