"""Semantic Versioning 2.0 parsing and precedence, for package and agent versions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from agent.errors import ManifestError

# The official semver.org regex, without named groups; numbers have no leading zeros.
# fullmatch and re.ASCII: "1.0.0\n" and other scripts' digits ("1.\u0663.0") are not versions.
_SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?",
    re.ASCII,
)
MAX_VERSION_CHARS = 128


@total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """A parsed semantic version; ordering follows semver precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after all its prereleases; numeric identifiers sort before
        # alphanumeric ones and compare as numbers.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()


def parse_version(text: object, where: str = "version") -> Version:
    """Parse ``MAJOR.MINOR.PATCH[-PRE][+BUILD]``; ManifestError naming ``where`` otherwise."""
    if not isinstance(text, str):
        raise ManifestError(f"{where}: expected a semver string, got {type(text).__name__}")
    if len(text) > MAX_VERSION_CHARS:
        raise ManifestError(f"{where}: version longer than {MAX_VERSION_CHARS} characters")
    match = _SEMVER_RE.fullmatch(text)
    if match is None:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ManifestError(f"{where}: {shown!r} is not a semantic version like 1.2.3")
    major, minor, patch, pre, build = match.groups()
    return Version(
        int(major),
        int(minor),
        int(patch),
        tuple(pre.split(".")) if pre else (),
        tuple(build.split(".")) if build else (),
    )
