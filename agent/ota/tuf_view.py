"""The one place edge-agent reads python-tuf's Updater internals (checked by tests per release).

python-tuf's ngclient has no public way to verify at a chosen time or to read the
metadata it just verified, and both are what the device's freshness clock needs: expiry
is judged against the last-known-good time (not a boot clock that may be years off), and
the mark only moves to the earliest expiry of the roles that verified. Everything here
reaches into ``Updater._trusted_set``; pyproject.toml pins ``tuf`` to the releases
tests/ota/test_tuf_view.py has run against, so an upgrade that moves it fails there first.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from tuf.ngclient.updater import Updater

# what pyproject.toml allows; the test checks the installed tuf is inside it
TESTED_TUF_MAJORS = (7,)


@dataclass(frozen=True)
class TrustedRoles:
    """Versions and expiries of the metadata one refresh verified."""

    versions: dict[str, int]  # root, timestamp, snapshot, targets
    expires_s: dict[str, float]  # the same roles, plus delegated roles loaded so far
    consistent_snapshot: bool


def set_reference_time(updater: Updater, when_s: float) -> None:
    """Judge expiry at ``when_s`` (Unix seconds) in this updater's next refresh."""
    trusted = updater._trusted_set  # private: see the module docstring
    trusted.reference_time = dt.datetime.fromtimestamp(when_s, dt.timezone.utc)


def trusted_roles(updater: Updater, delegated: tuple[str, ...] = ()) -> TrustedRoles:
    """The top-level roles this updater verified, and the ``delegated`` ones it loaded."""
    trusted = updater._trusted_set  # private: see the module docstring
    top: dict[str, Any] = {
        "root": trusted.root,
        "timestamp": trusted.timestamp,
        "snapshot": trusted.snapshot,
        "targets": trusted.targets,
    }
    expires = {name: signed.expires.timestamp() for name, signed in top.items()}
    for role in delegated:
        try:
            expires[role] = trusted[role].expires.timestamp()
        except KeyError:
            continue  # not loaded by this check
    return TrustedRoles(
        versions={name: int(signed.version) for name, signed in top.items()},
        expires_s=expires,
        consistent_snapshot=bool(trusted.root.consistent_snapshot),
    )
