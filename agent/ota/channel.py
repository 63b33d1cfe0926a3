"""Channel client: TUF-verified channel documents, TUF version high-water marks, trusted clock."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata
from tuf.api.serialization import DeserializationError
from tuf.ngclient.updater import Updater

from agent.errors import DowngradeError, FetchError, RepositoryError, StateError
from agent.ota.download import TargetRef
from agent.ota.fetch import HttpFetcher, TufFetcher
from agent.ota.journal import Journal
from agent.ota.tuf_view import set_reference_time, trusted_roles
from agent.package.revert import MAX_REVERT_BYTES, RevertAuthorisation, revert_target

log = logging.getLogger(__name__)

MAX_CHANNEL_BYTES = 64 << 10
LKG_MARK = "clock.last_known_good_s"
TUF_ROLES = ("root", "timestamp", "snapshot", "targets")


@dataclass(frozen=True)
class ChannelDocument:
    """``channels/<name>.json``: which release a channel offers and to how much of the fleet."""

    channel: str
    package: str
    version: str
    target: str
    release_counter: int
    percent: float
    salt: str
    stage: int = 0
    paused: bool = False
    aborted: bool = False
    revert_versions: tuple[str, ...] = ()
    updated: str = ""
    # sha256 of the exact document bytes: refusals are kept until this changes
    fingerprint: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)
    # Never parsed from the document: the device attaches the release role's revert
    # authorisation for this version once its release-threshold signatures verified.
    revert: RevertAuthorisation | None = None

    @classmethod
    def parse(cls, data: bytes, where: str) -> ChannelDocument:
        """Parse and type-check a channel document; RepositoryError names the bad field."""
        if len(data) > MAX_CHANNEL_BYTES:
            raise RepositoryError(f"{where}: channel document over {MAX_CHANNEL_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"{where}: channel document is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise RepositoryError(f"{where}: channel document must be a JSON object")
        release = _field(doc, "release", dict, where)
        rollout = _field(doc, "rollout", dict, where)
        reverts = doc.get("revert_versions", [])
        if not isinstance(reverts, list) or not all(isinstance(v, str) for v in reverts):
            raise RepositoryError(f"{where}: revert_versions must be a list of strings")
        percent = _field(rollout, "percent", (int, float), where, "rollout.")
        if not 0 <= float(percent) <= 100:
            raise RepositoryError(f"{where}: rollout.percent must be within 0..100")
        target = _field(release, "target", str, where, "release.")
        if not target.startswith("packages/"):
            raise RepositoryError(f"{where}: release.target must be under packages/")
        return cls(
            channel=_field(doc, "channel", str, where),
            package=_field(doc, "package", str, where),
            version=_field(release, "version", str, where, "release."),
            target=target,
            release_counter=int(_field(release, "release_counter", int, where, "release.")),
            percent=float(percent),
            salt=_field(rollout, "salt", str, where, "rollout."),
            stage=int(rollout.get("stage", 0)),
            paused=bool(rollout.get("paused", False)),
            aborted=bool(rollout.get("aborted", False)),
            revert_versions=tuple(reverts),
            updated=str(doc.get("updated", "")),
            fingerprint=hashlib.sha256(data).hexdigest(),
            raw=doc,
        )

    def updated_epoch_s(self) -> float | None:
        try:
            when = dt.datetime.fromisoformat(self.updated.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return when.timestamp()


def _field(doc: Mapping[str, Any], key: str, kind: Any, where: str, prefix: str = "") -> Any:
    if key not in doc:
        raise RepositoryError(f"{where}: channel document lacks {prefix}{key}")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RepositoryError(f"{where}: {prefix}{key} has the wrong type")
    return value


class LastKnownGoodClock:
    """The time TUF expiry is judged at: the system clock, or the last-known-good mark when
    the clock reads earlier than the mark (a Raspberry Pi without RTC boots in the past).

    The mark (an fsynced journal high-water mark) moves only through ``confirm``: after a
    refresh verified at one system-clock reading, to that reading, capped at the earliest
    expiry of the metadata just verified. A reading is thus trusted only when metadata
    signed by the timestamp, snapshot, targets and channel roles was valid at it; a clock
    years ahead verifies nothing (the offline targets role expires first), so it never
    moves the mark and heals as soon as the clock is right. Channel documents (rollout
    key) and unverified readings never move it.
    """

    def __init__(self, journal: Journal, system_clock: Callable[[], float] = time.time) -> None:
        self._journal = journal
        self._system_clock = system_clock

    def mark_s(self) -> float:
        return float(self._journal.mark(LKG_MARK))

    def system_s(self) -> float:
        return float(self._system_clock())

    def reference_s(self, reading_s: float | None = None) -> float:
        """The expiry reference for a clock ``reading_s`` (default: read the clock now)."""
        reading = self.system_s() if reading_s is None else reading_s
        return max(reading, self.mark_s())

    def now_s(self) -> float:
        return self.reference_s()

    def cap(self, limit_s: float) -> None:
        """Lower the mark to ``limit_s`` when it is above (healing a mark no verified check
        could have set; see ChannelClient._heal_mark)."""
        mark = self.mark_s()
        if mark > limit_s:
            log.warning(
                "last-known-good time %d is past anything this device verified; lowered to %d",
                mark,
                int(limit_s),
            )
            # marks only rise, so forget and raise again; a kill in between leaves no mark,
            # which the next verified check sets again
            self._journal.delete_mark(LKG_MARK)
            self._journal.raise_mark(LKG_MARK, int(limit_s))

    def confirm(self, reading_s: float, expires_s: Sequence[float]) -> None:
        """Raise the mark to ``reading_s``, capped at ``expires_s``: call only after metadata
        with those expiries verified at ``reference_s(reading_s)``."""
        seen = min([reading_s, *expires_s])
        if seen > self.mark_s():
            self._journal.raise_mark(LKG_MARK, int(seen))


@dataclass(frozen=True)
class ChannelState:
    """A verified channel document and the package target it names.

    ``revert`` holds the bytes of the release role's revert authorisation for the offered
    version when the caller asked for it and the repository has one (TUF checked its hash;
    its own release-threshold signatures are the device's to check against its keyring).
    """

    document: ChannelDocument
    package: TargetRef
    tuf_versions: Mapping[str, int]
    revert: bytes | None = None


class ChannelNotPublishedError(RepositoryError):
    """The repository is genuine and fresh but signs no document for this channel yet."""


class ChannelClient:
    """Refreshes TUF metadata from ``repository_url`` and reads one channel's document."""

    def __init__(
        self,
        state_dir: Path,
        repository_url: str,
        journal: Journal,
        http: HttpFetcher | None = None,
        clock: LastKnownGoodClock | None = None,
    ) -> None:
        self.metadata_dir = state_dir / "tuf"
        self.staging_dir = state_dir / "staging"
        self.base_url = repository_url.rstrip("/")
        self.journal = journal
        self.http = http or HttpFetcher()
        self.clock = clock or LastKnownGoodClock(journal)

    def fetch_channel(
        self, channel: str, want_revert: Callable[[ChannelDocument], bool] | None = None
    ) -> ChannelState:
        """Refresh TUF, verify ``channels/<channel>.json`` and look up its package target.

        ``want_revert(doc)`` True: also fetch the release role's revert authorisation for
        the offered version, if the repository signs one. Raises RepositoryError for bad,
        expired or replayed metadata (ChannelNotPublishedError when the channel has no
        document yet), FetchError when the repository cannot be reached.
        """
        if not (self.metadata_dir / "root.json").exists():
            raise StateError(
                f"{self.metadata_dir}/root.json: no trusted TUF root (run edge-agent provision)"
            )
        self._heal_mark()
        # One reading for the whole check: it is the time the metadata is verified at, and
        # the only one the last-known-good mark may move to afterwards.
        reading_s = self.clock.system_s()
        revert: bytes | None = None
        try:
            updater = self._updater()
            # Expiry is judged against the last-known-good time, not a stale boot clock.
            set_reference_time(updater, self.clock.reference_s(reading_s))
            updater.refresh()
            versions = self._check_marks(updater)
            doc = self._channel_document(updater, channel, reading_s)
            ref = self._package_ref(updater, doc, f"channels/{channel}.json")
            if want_revert is not None and want_revert(doc):
                revert = self._fetch_revert(updater, doc)
            self._confirm_clock(updater, reading_s)
        except tuf_exceptions.ExpiredMetadataError as exc:
            raise RepositoryError(f"{self.base_url}: expired TUF metadata ({exc})") from None
        except tuf_exceptions.BadVersionNumberError as exc:
            raise RepositoryError(
                f"{self.base_url}: replayed or frozen TUF metadata ({exc})"
            ) from None
        except tuf_exceptions.RepositoryError as exc:
            raise RepositoryError(f"{self.base_url}: TUF metadata refused ({exc})") from None
        except tuf_exceptions.DownloadError as exc:
            raise FetchError(f"{self.base_url}: cannot fetch TUF metadata ({exc})") from None
        except OSError as exc:
            raise StateError(f"{self.metadata_dir}: cannot store TUF metadata ({exc})") from None
        return ChannelState(document=doc, package=ref, tuf_versions=versions, revert=revert)

    def _updater(self) -> Updater:
        return Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=f"{self.base_url}/metadata/",
            target_dir=str(self.staging_dir),
            target_base_url=f"{self.base_url}/targets/",
            fetcher=TufFetcher(self.http),
            bootstrap=None,
        )

    def _channel_document(
        self, updater: Updater, channel: str, reading_s: float
    ) -> ChannelDocument:
        """The verified channels/<channel>.json, downloaded into staging (TUF errors pass)."""
        channel_path = f"channels/{channel}.json"
        info = updater.get_targetinfo(channel_path)
        if info is None:
            self._confirm_clock(updater, reading_s)
            raise ChannelNotPublishedError(
                f"{self.base_url}: channel {channel!r} is not published yet "
                f"(no signed target {channel_path})"
            )
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        dest = self.staging_dir / f"channel-{channel}.json"
        updater.download_target(info, filepath=str(dest))
        data = dest.read_bytes()
        doc = ChannelDocument.parse(data, f"{self.base_url}/targets/{channel_path}")
        if doc.channel != channel:
            raise RepositoryError(
                f"{channel_path}: document is for channel {doc.channel!r}, not {channel!r}"
            )
        return doc

    def _package_ref(self, updater: Updater, doc: ChannelDocument, channel_path: str) -> TargetRef:
        """Where the package the channel names is, with its signed length and sha256."""
        pkg = updater.get_targetinfo(doc.target)
        if pkg is None:
            raise RepositoryError(f"{channel_path}: names {doc.target}, which is not signed")
        sha = pkg.hashes.get("sha256")
        if not sha:
            raise RepositoryError(f"{doc.target}: target has no sha256 hash")
        url_path = doc.target
        if trusted_roles(updater).consistent_snapshot:
            dirname, sep, base = doc.target.rpartition("/")
            url_path = f"{dirname}{sep}{sha}.{base}"
        return TargetRef(
            url=f"{self.base_url}/targets/{url_path}",
            length=int(pkg.length),
            sha256=sha,
            filename=doc.target.rpartition("/")[2],
        )

    def _heal_mark(self) -> None:
        """A verified check never leaves the mark past the expiry of the timestamp it
        verified (and a later timestamp is only trusted when valid at the mark), so a mark
        past the locally trusted timestamp's expiry came from an older agent (a channel
        document's ``updated`` or one wrong clock reading): lower it to that expiry, and
        the genuine repository is followed again."""
        try:
            data = (self.metadata_dir / "timestamp.json").read_bytes()
            expires = Metadata.from_bytes(data).signed.expires
        except (OSError, DeserializationError):
            return  # no timestamp trusted yet: nothing to compare with
        # a check that verified it ran before it expired: at most one second before
        self.clock.cap(expires.timestamp() - 1)

    def _fetch_revert(self, updater: Updater, doc: ChannelDocument) -> bytes | None:
        """The revert authorisation target for the offered version, or None without one."""
        target = revert_target(doc.package, doc.version)
        info = updater.get_targetinfo(target)
        if info is None:
            return None
        if info.length > MAX_REVERT_BYTES:
            raise RepositoryError(f"{target}: {info.length} bytes, over {MAX_REVERT_BYTES}")
        dest = self.staging_dir / f"revert-{doc.channel}.json"
        updater.download_target(info, filepath=str(dest))
        return dest.read_bytes()

    def _confirm_clock(self, updater: Updater, reading_s: float) -> None:
        """Every role this check used verified at ``reading_s``: let the mark move to it,
        but never past the earliest expiry among them."""
        roles = trusted_roles(updater, delegated=("rollout", "release"))
        expires = [s for name, s in roles.expires_s.items() if name != "root"]
        self.clock.confirm(reading_s, expires)

    def _check_marks(self, updater: Updater) -> dict[str, int]:
        versions = trusted_roles(updater).versions
        for role, version in versions.items():
            try:
                self.journal.raise_mark(f"tuf.{role}", version)
            except DowngradeError:
                raise RepositoryError(
                    f"{self.base_url}: {role} metadata version {version} is below the "
                    f"{self.journal.mark(f'tuf.{role}')} this device already trusted (replay)"
                ) from None
        return versions
