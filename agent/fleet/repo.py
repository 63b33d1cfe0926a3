"""The TUF repository on disk: init, publish, channel documents, refresh and root rotation."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# tuf and securesystemslib re-export these names without __all__, which mypy --strict flags.
from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from agent.errors import (
    ConfigError,
    DowngradeError,
    ManifestError,
    RepositoryError,
    SignatureError,
    UsageError,
)
from agent.fleet.keys import OperatorKey, keys_for_role
from agent.package.revert import REVERT_SUFFIX
from agent.package.semver import Version, parse_version
from agent.textio import atomic_file, file_lock, open_regular, write_atomic

log = logging.getLogger(__name__)

RELEASE_ROLE = "release"
ROLLOUT_ROLE = "rollout"
PACKAGE_PATTERN = "packages/*"
CHANNEL_PATTERN = "channels/*"
MAX_METADATA_BYTES = 4 << 20
MAX_CHANNEL_BYTES = 64 << 10
# matched with fullmatch: "stable\n" is not a channel name
CHANNEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RepoExpiry:
    """How long each role's metadata stays valid; online roles are re-signed by `repo refresh`."""

    root_days: float = 365.0
    targets_days: float = 365.0
    release_days: float = 365.0
    rollout_days: float = 30.0
    snapshot_days: float = 7.0
    timestamp_days: float = 1.0
    # `repo refresh` re-signs an online role when it expires within this margin.
    refresh_margin_fraction: float = 0.5

    def days_for(self, role: str) -> float:
        return float(getattr(self, f"{role}_days"))


@dataclass(frozen=True)
class PublishedPackage:
    name: str
    version: str
    release_counter: int
    target: str
    length: int
    sha256: str


@dataclass
class LoadedRepo:
    """The repository's current trusted metadata, loaded by following timestamp -> snapshot."""

    base: Path
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]
    delegated: dict[str, Metadata[Targets]] = field(default_factory=dict)

    @property
    def metadata_dir(self) -> Path:
        return self.base / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.base / "targets"


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _expiry(now: datetime, days: float) -> datetime:
    return (now + timedelta(days=days)).replace(microsecond=0)


def semver_key(version: str) -> Version:
    """Sort key for semantic versions: the package area's one semver parser (a pre-release
    sorts before its release; "1.0.0\n" and other scripts' digits are not versions)."""
    return parse_version(version)


# ---------------------------------------------------------------------------------------
# Reading and writing metadata files
# ---------------------------------------------------------------------------------------


def _serialize(md: Metadata[Any]) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False)) + b"\n"


def _read_metadata(path: Path) -> Metadata[Any]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RepositoryError(f"corrupt repository: {path} is missing") from None
    if size > MAX_METADATA_BYTES:
        raise RepositoryError(f"corrupt repository: {path} is {size} bytes (too large)")
    try:
        return Metadata.from_bytes(path.read_bytes())
    except DeserializationError as exc:
        raise RepositoryError(f"corrupt repository: {path} is not TUF metadata ({exc})") from None


def _write_metadata(metadata_dir: Path, role: str, md: Metadata[Any]) -> None:
    data = _serialize(md)
    if role == "timestamp":
        write_atomic(metadata_dir / "timestamp.json", data)
        return
    write_atomic(metadata_dir / f"{md.signed.version}.{role}.json", data)
    if role == "root":
        # root.json is the newest root, for provisioning devices and for plain clients.
        write_atomic(metadata_dir / "root.json", data)


def _verify(delegator: Metadata[Any], role: str, md: Metadata[Any], where: Path) -> None:
    try:
        delegator.verify_delegate(role, md)
    except UnsignedMetadataError as exc:
        raise RepositoryError(
            f"corrupt repository: {where} is not validly signed ({exc})"
        ) from None
    except ValueError as exc:
        raise RepositoryError(f"corrupt repository: {where}: {exc}") from None


def _check_type(md: Metadata[Any], cls: type, where: Path) -> None:
    if not isinstance(md.signed, cls):
        raise RepositoryError(f"corrupt repository: {where} holds {md.signed.type} metadata")


def load_repo(base: Path) -> LoadedRepo:
    """Load and verify every role's current metadata; RepositoryError names the broken file."""
    metadata_dir = base / "metadata"
    if not (metadata_dir / "1.root.json").exists():
        raise RepositoryError(f"{base}: not a repository (no metadata/1.root.json; run repo init)")
    root: Metadata[Root] = _read_metadata(metadata_dir / "1.root.json")
    _check_type(root, Root, metadata_dir / "1.root.json")
    _verify(root, "root", root, metadata_dir / "1.root.json")
    version = 2
    while (path := metadata_dir / f"{version}.root.json").exists():
        new_root: Metadata[Root] = _read_metadata(path)
        _check_type(new_root, Root, path)
        _verify(root, "root", new_root, path)
        _verify(new_root, "root", new_root, path)
        if new_root.signed.version != version:
            raise RepositoryError(
                f"corrupt repository: {path} has version {new_root.signed.version}"
            )
        root = new_root
        version += 1
    ts_path = metadata_dir / "timestamp.json"
    timestamp: Metadata[Timestamp] = _read_metadata(ts_path)
    _check_type(timestamp, Timestamp, ts_path)
    _verify(root, "timestamp", timestamp, ts_path)
    snap_path = metadata_dir / f"{timestamp.signed.snapshot_meta.version}.snapshot.json"
    snapshot: Metadata[Snapshot] = _read_metadata(snap_path)
    _check_type(snapshot, Snapshot, snap_path)
    _verify(root, "snapshot", snapshot, snap_path)
    if snapshot.signed.version != timestamp.signed.snapshot_meta.version:
        raise RepositoryError(f"corrupt repository: {snap_path} version does not match timestamp")
    targets_meta = snapshot.signed.meta.get("targets.json")
    if targets_meta is None:
        raise RepositoryError(f"corrupt repository: {snap_path} does not list targets.json")
    tgt_path = metadata_dir / f"{targets_meta.version}.targets.json"
    targets: Metadata[Targets] = _read_metadata(tgt_path)
    _check_type(targets, Targets, tgt_path)
    _verify(root, "targets", targets, tgt_path)
    repo = LoadedRepo(base, root, targets, snapshot, timestamp)
    for role in (RELEASE_ROLE, ROLLOUT_ROLE):
        meta = snapshot.signed.meta.get(f"{role}.json")
        if meta is None:
            continue
        path = metadata_dir / f"{meta.version}.{role}.json"
        md: Metadata[Targets] = _read_metadata(path)
        _check_type(md, Targets, path)
        _verify(targets, role, md, path)
        if md.signed.version != meta.version:
            raise RepositoryError(f"corrupt repository: {path} version does not match snapshot")
        repo.delegated[role] = md
    return repo


@contextmanager
def repo_lock(base: Path) -> Iterator[None]:
    """One writer at a time (the server's controller and an operator command may overlap)."""
    with file_lock(base / ".lock"):
        yield


# ---------------------------------------------------------------------------------------
# Signing helpers
# ---------------------------------------------------------------------------------------


def _signers_for(
    repo_keyids: Sequence[str], threshold: int, keys: Sequence[OperatorKey], role: str
) -> list[Signer]:
    """Signers (private keys present) that the repository trusts for a role; at least threshold."""
    wanted = set(repo_keyids)
    signers: list[Signer] = [k.signer for k in keys if k.keyid in wanted and k.signer is not None]
    if len(signers) < threshold:
        raise SignatureError(
            f"{role} role needs {threshold} private key(s) the repository trusts, "
            f"found {len(signers)} in the key folder"
        )
    return signers


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


def _check_key_expiry(keys: Sequence[OperatorKey], now: datetime) -> None:
    for key in keys:
        if key.expires is not None and key.expires <= now:
            raise SignatureError(
                f"{key.role} key {key.keyid[:12]} expired on "
                f"{key.expires.isoformat()} ({key.pub_path})"
            )


def _check_offline_roles_fresh(repo: LoadedRepo, now: datetime) -> None:
    """Online roles cannot fix an expired offline role: refuse early with what to re-sign."""
    for role, md in (("root", repo.root), ("targets", repo.targets)):
        if md.signed.is_expired(now):
            raise RepositoryError(
                f"{role} metadata expired on {md.signed.expires.isoformat()} "
                f"({repo.base}); re-sign it with the offline {role} key"
            )


def _top_signers(repo: LoadedRepo, role: str, keys: Sequence[OperatorKey]) -> list[Signer]:
    r = repo.root.signed.roles[role]
    return _signers_for(r.keyids, r.threshold, keys, role)


def _delegated_role(repo: LoadedRepo, role: str) -> DelegatedRole:
    delegations = repo.targets.signed.delegations
    if delegations is None or delegations.roles is None or role not in delegations.roles:
        raise RepositoryError(f"corrupt repository: targets does not delegate {role!r}")
    return delegations.roles[role]


def _write_snapshot_and_timestamp(
    repo: LoadedRepo,
    changed: dict[str, int],
    keys: Sequence[OperatorKey],
    now: datetime,
    expiry: RepoExpiry,
) -> None:
    """New snapshot listing the changed roles' versions, then the timestamp (written last)."""
    snap_signers = _top_signers(repo, "snapshot", keys)
    ts_signers = _top_signers(repo, "timestamp", keys)
    snapshot = repo.snapshot
    for role, version in changed.items():
        snapshot.signed.meta[f"{role}.json"] = MetaFile(version=version)
    snapshot.signed.version += 1
    snapshot.signed.expires = _expiry(now, expiry.snapshot_days)
    _sign(snapshot, snap_signers)
    timestamp = repo.timestamp
    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
    timestamp.signed.version += 1
    timestamp.signed.expires = _expiry(now, expiry.timestamp_days)
    _sign(timestamp, ts_signers)
    _write_metadata(repo.metadata_dir, "snapshot", snapshot)
    # Clients start from timestamp.json: until it is replaced the old snapshot stays current,
    # so a crash before this line leaves the repository as it was.
    _write_metadata(repo.metadata_dir, "timestamp", timestamp)


# ---------------------------------------------------------------------------------------
# repo init
# ---------------------------------------------------------------------------------------


def init_repo(
    base: Path,
    keys: Sequence[OperatorKey],
    release_threshold: int = 1,
    root_threshold: int = 1,
    expiry: RepoExpiry | None = None,
    now: datetime | None = None,
) -> LoadedRepo:
    """Create a repository: root, targets (delegating release and rollout), snapshot, timestamp."""
    expiry = expiry or RepoExpiry()
    now = now or utc_now()
    if (base / "metadata").exists() and any((base / "metadata").iterdir()):
        raise UsageError(f"{base}: already holds a repository (metadata/ is not empty)")
    _check_key_expiry(keys, now)
    by_role = _keys_by_role(keys, release_threshold, root_threshold)
    root, root_md = _signed_root(by_role, keys, root_threshold, _expiry(now, expiry.root_days))
    targets_md = _signed_targets(
        by_role, keys, root, release_threshold, _expiry(now, expiry.targets_days)
    )
    # Empty release and rollout metadata (version 1), listed in the snapshot, so a device
    # provisioned before the first publish or rollout finds every delegated role and polls
    # cleanly ("not published yet") instead of failing on a role missing from the snapshot.
    delegated_md: dict[str, Metadata[Targets]] = {}
    for role, threshold in ((RELEASE_ROLE, release_threshold), (ROLLOUT_ROLE, 1)):
        md: Metadata[Targets] = Metadata(
            Targets(version=1, expires=_expiry(now, expiry.days_for(role)))
        )
        keyids = [key.keyid for key in by_role[role]]
        _sign(md, _signers_for(keyids, threshold, keys, role))
        delegated_md[role] = md
    snapshot_md = Metadata(
        Snapshot(
            expires=_expiry(now, expiry.snapshot_days),
            meta={
                "targets.json": MetaFile(1),
                f"{RELEASE_ROLE}.json": MetaFile(1),
                f"{ROLLOUT_ROLE}.json": MetaFile(1),
            },
        )
    )
    _sign(snapshot_md, _signers_for(root.roles["snapshot"].keyids, 1, keys, "snapshot"))
    timestamp_md = Metadata(
        Timestamp(expires=_expiry(now, expiry.timestamp_days), snapshot_meta=MetaFile(1))
    )
    _sign(timestamp_md, _signers_for(root.roles["timestamp"].keyids, 1, keys, "timestamp"))
    metadata_dir = base / "metadata"
    (base / "targets").mkdir(parents=True, exist_ok=True)
    with repo_lock(base):
        _write_metadata(metadata_dir, "root", root_md)
        _write_metadata(metadata_dir, "targets", targets_md)
        for role, md in delegated_md.items():
            _write_metadata(metadata_dir, role, md)
        _write_metadata(metadata_dir, "snapshot", snapshot_md)
        _write_metadata(metadata_dir, "timestamp", timestamp_md)
    log.info("repository created in %s", base)
    return load_repo(base)


def _keys_by_role(
    keys: Sequence[OperatorKey], release_threshold: int, root_threshold: int
) -> dict[str, list[OperatorKey]]:
    """Each role's keys; every role needs one, and each threshold enough keys to meet it."""
    by_role = {
        role: keys_for_role(keys, role)
        for role in ("root", "targets", "snapshot", "timestamp", "release", "rollout")
    }
    for role, found in by_role.items():
        if not found:
            raise ConfigError(f"no {role} key (*.pub.json with role {role!r}) in the key folder")
    if not 1 <= release_threshold <= len(by_role["release"]):
        raise UsageError(
            f"release threshold {release_threshold} needs 1..{len(by_role['release'])} release keys"
        )
    if not 1 <= root_threshold <= len(by_role["root"]):
        raise UsageError(f"root threshold {root_threshold} needs 1..{len(by_role['root'])} keys")
    return by_role


def _signed_root(
    by_role: Mapping[str, Sequence[OperatorKey]],
    keys: Sequence[OperatorKey],
    root_threshold: int,
    expires: datetime,
) -> tuple[Root, Metadata[Root]]:
    """Version 1 of root, trusting the root, targets, snapshot and timestamp keys."""
    root = Root(expires=expires, consistent_snapshot=True)
    for role in ("root", "targets", "snapshot", "timestamp"):
        for key in by_role[role]:
            root.add_key(key.tuf_key, role)
    root.roles["root"].threshold = root_threshold
    root_md = Metadata(root)
    _sign(root_md, _signers_for(root.roles["root"].keyids, root_threshold, keys, "root"))
    return root, root_md


def _signed_targets(
    by_role: Mapping[str, Sequence[OperatorKey]],
    keys: Sequence[OperatorKey],
    root: Root,
    release_threshold: int,
    expires: datetime,
) -> Metadata[Targets]:
    """Version 1 of targets, delegating packages to release and channels to rollout."""
    delegations = Delegations(keys={}, roles={})
    assert delegations.roles is not None
    delegations.roles[RELEASE_ROLE] = DelegatedRole(
        RELEASE_ROLE, [], release_threshold, True, paths=[PACKAGE_PATTERN]
    )
    delegations.roles[ROLLOUT_ROLE] = DelegatedRole(
        ROLLOUT_ROLE, [], 1, True, paths=[CHANNEL_PATTERN]
    )
    targets = Targets(expires=expires, delegations=delegations)
    for role in (RELEASE_ROLE, ROLLOUT_ROLE):
        for key in by_role[role]:
            targets.add_key(key.tuf_key, role)
    targets_md = Metadata(targets)
    _sign(targets_md, _signers_for(root.roles["targets"].keyids, 1, keys, "targets"))
    return targets_md


# ---------------------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageFacts:
    """What publish needs from a verified package."""

    name: str
    version: str
    release_counter: int


def verify_package_for_publish(tar_path: Path, repo: LoadedRepo) -> PackageFacts:
    """The device's own check (agent.package.verify_package) against the keyring that the
    repository's release delegation names: the same keys and the same threshold."""
    from agent.package import Keyring, PublicKey, verify_package
    from agent.package.keys import RoleKeys

    trusted, threshold = _release_keyring(repo)
    keyring = Keyring(
        roles={RELEASE_ROLE: RoleKeys(tuple(trusted), threshold)},
        keys={
            kid: PublicKey(kid, RELEASE_ROLE, Ed25519PublicKey.from_public_bytes(bytes.fromhex(h)))
            for kid, h in trusted.items()
        },
        source=f"{repo.base} release delegation",
    )
    if not tar_path.is_file():
        raise UsageError(f"{tar_path}: package file not found")
    manifest = verify_package(tar_path, keyring)
    if not CHANNEL_NAME_RE.fullmatch(manifest.name):
        raise ManifestError(f"{tar_path}: package name {manifest.name!r} is not usable in a path")
    semver_key(manifest.version)
    return PackageFacts(manifest.name, manifest.version, manifest.release_counter)


def _release_keyring(repo: LoadedRepo) -> tuple[dict[str, str], int]:
    role = _delegated_role(repo, RELEASE_ROLE)
    delegations = repo.targets.signed.delegations
    assert delegations is not None
    trusted = {kid: str(delegations.keys[kid].keyval["public"]) for kid in role.keyids}
    return trusted, role.threshold


def published_packages(repo: LoadedRepo, name: str | None = None) -> list[PublishedPackage]:
    md = repo.delegated.get(RELEASE_ROLE)
    if md is None:
        return []
    out = []
    for path, target in md.signed.targets.items():
        if path.endswith(REVERT_SUFFIX):
            continue  # revert authorisations live beside the packages, under packages/*
        custom = target.custom
        if name is not None and custom.get("name") != name:
            continue
        out.append(
            PublishedPackage(
                name=str(custom.get("name")),
                version=str(custom.get("version")),
                release_counter=int(custom.get("release_counter", 0)),
                target=path,
                length=target.length,
                sha256=target.hashes["sha256"],
            )
        )
    out.sort(key=lambda p: semver_key(p.version))
    return out


def _new_delegated(role: str, now: datetime, expiry: RepoExpiry) -> Metadata[Targets]:
    # Version 0 is invalid in TUF; callers bump the version before signing, so start below 1
    # by building version 1 and stepping back.
    md: Metadata[Targets] = Metadata(
        Targets(version=1, expires=_expiry(now, expiry.days_for(role)))
    )
    md.signed.version = 0
    return md


def _hashed_target_path(targets_dir: Path, target: str, sha256: str) -> Path:
    parent, _, basename = target.rpartition("/")
    return targets_dir / parent / f"{sha256}.{basename}"


def publish_package(
    base: Path,
    tar_path: Path,
    keys: Sequence[OperatorKey],
    channel: str | None = None,
    expiry: RepoExpiry | None = None,
    now: datetime | None = None,
) -> PublishedPackage:
    """Add a signed package to the release role. Every check runs before the first write."""
    expiry = expiry or RepoExpiry()
    now = now or utc_now()
    _check_key_expiry(keys, now)
    with repo_lock(base):
        repo = load_repo(base)
        _check_offline_roles_fresh(repo, now)
        facts = verify_package_for_publish(tar_path, repo)
        if channel is not None:
            doc = read_channel(repo, channel)
            if doc is not None and doc.get("package") != facts.name:
                raise UsageError(
                    f"package {facts.name!r} does not match channel {channel!r}, "
                    f"which carries {doc.get('package')!r}"
                )
        target = f"packages/{facts.name}-{facts.version}.tar"
        for old in published_packages(repo, facts.name):
            if old.version == facts.version:
                raise DowngradeError(f"{facts.name} {facts.version} is already published ({base})")
            if semver_key(old.version) > semver_key(facts.version):
                raise DowngradeError(
                    f"{facts.name} {facts.version} is lower than published {old.version}"
                )
            if old.release_counter >= facts.release_counter:
                raise DowngradeError(
                    f"{facts.name} {facts.version} release_counter {facts.release_counter} is not "
                    f"above published {old.version}'s {old.release_counter}"
                )
        release_signers = _delegation_signers(repo, RELEASE_ROLE, keys)

        tfile = TargetFile.from_file(target, str(tar_path), ["sha256"])
        tfile.unrecognized_fields["custom"] = {
            "name": facts.name,
            "version": facts.version,
            "release_counter": facts.release_counter,
        }
        dest = _hashed_target_path(repo.targets_dir, target, tfile.hashes["sha256"])
        _copy_atomic(tar_path, dest)
        _add_delegated_target(repo, RELEASE_ROLE, target, tfile, release_signers, keys, now, expiry)
    log.info("published %s %s as %s", facts.name, facts.version, target)
    return PublishedPackage(
        facts.name,
        facts.version,
        facts.release_counter,
        target,
        tfile.length,
        tfile.hashes["sha256"],
    )


def publish_revert(
    base: Path,
    revert_path: Path,
    keys: Sequence[OperatorKey],
    expiry: RepoExpiry | None = None,
    now: datetime | None = None,
) -> PublishedPackage:
    """Add a release-threshold-signed revert authorisation (``package sign-revert``) to the
    release role as ``packages/<name>-<version>.revert.json``; it must name a published
    release and carry a threshold of the delegation's release signatures."""
    from agent.package import Keyring, PublicKey
    from agent.package.keys import RoleKeys
    from agent.package.revert import revert_target, verify_revert

    expiry = expiry or RepoExpiry()
    now = now or utc_now()
    _check_key_expiry(keys, now)
    if not revert_path.is_file():
        raise UsageError(f"{revert_path}: revert file not found")
    data = revert_path.read_bytes()
    with repo_lock(base):
        repo = load_repo(base)
        _check_offline_roles_fresh(repo, now)
        trusted, threshold = _release_keyring(repo)
        keyring = Keyring(
            roles={RELEASE_ROLE: RoleKeys(tuple(trusted), threshold)},
            keys={
                kid: PublicKey(
                    kid, RELEASE_ROLE, Ed25519PublicKey.from_public_bytes(bytes.fromhex(h))
                )
                for kid, h in trusted.items()
            },
            source=f"{repo.base} release delegation",
        )
        auth = verify_revert(data, keyring, str(revert_path))
        match = [
            p
            for p in published_packages(repo, auth.package)
            if (p.version, p.release_counter) == (auth.version, auth.release_counter)
        ]
        if not match:
            raise UsageError(
                f"{revert_path}: {auth.package} {auth.version} (release_counter "
                f"{auth.release_counter}) is not a published release"
            )
        release_signers = _delegation_signers(repo, RELEASE_ROLE, keys)
        target = revert_target(auth.package, auth.version)
        tfile = TargetFile.from_data(target, data, ["sha256"])
        tfile.unrecognized_fields["custom"] = {"revert": auth.body()}
        write_atomic(_hashed_target_path(repo.targets_dir, target, tfile.hashes["sha256"]), data)
        _add_delegated_target(repo, RELEASE_ROLE, target, tfile, release_signers, keys, now, expiry)
    log.info("published revert to %s %s as %s", auth.package, auth.version, target)
    return PublishedPackage(
        auth.package,
        auth.version,
        auth.release_counter,
        target,
        tfile.length,
        tfile.hashes["sha256"],
    )


def _delegation_signers(
    repo: LoadedRepo, role_name: str, keys: Sequence[OperatorKey]
) -> list[Signer]:
    """Signers for a delegated role, after checking the online snapshot and timestamp keys
    are there too, so a refusal never leaves a half-written repository."""
    role = _delegated_role(repo, role_name)
    signers = _signers_for(role.keyids, role.threshold, keys, role_name)
    _top_signers(repo, "snapshot", keys)
    _top_signers(repo, "timestamp", keys)
    return signers


def _add_delegated_target(
    repo: LoadedRepo,
    role_name: str,
    target: str,
    tfile: TargetFile,
    signers: Sequence[Signer],
    keys: Sequence[OperatorKey],
    now: datetime,
    expiry: RepoExpiry,
) -> None:
    """Record ``target`` in a delegated role, re-sign it, then snapshot and timestamp."""
    days = expiry.release_days if role_name == RELEASE_ROLE else expiry.rollout_days
    md = repo.delegated.get(role_name) or _new_delegated(role_name, now, expiry)
    md.signed.targets[target] = tfile
    md.signed.version += 1
    md.signed.expires = _expiry(now, days)
    _sign(md, signers)
    _write_metadata(repo.metadata_dir, role_name, md)
    _write_snapshot_and_timestamp(repo, {role_name: md.signed.version}, keys, now, expiry)


def _copy_atomic(src: Path, dest: Path) -> None:
    # atomic_file: an unguessable mkstemp name (a planted file or link at a fixed temp name
    # is never written through), fsync, rename, fsync of the folder
    with open_regular(src, "package file", UsageError) as fin, atomic_file(dest) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


# ---------------------------------------------------------------------------------------
# channels (the rollout role)
# ---------------------------------------------------------------------------------------


def check_channel_name(channel: str) -> str:
    if not CHANNEL_NAME_RE.fullmatch(channel):
        raise UsageError(f"channel name {channel!r}: use a-z, 0-9, '.', '_' or '-'")
    return channel


def read_channel(repo: LoadedRepo, channel: str) -> dict[str, Any] | None:
    """The current channel document, verified against its hash in the rollout metadata."""
    md = repo.delegated.get(ROLLOUT_ROLE)
    target = f"channels/{check_channel_name(channel)}.json"
    if md is None or target not in md.signed.targets:
        return None
    tfile = md.signed.targets[target]
    path = _hashed_target_path(repo.targets_dir, target, tfile.hashes["sha256"])
    try:
        data = path.read_bytes()
    except OSError:
        raise RepositoryError(f"corrupt repository: {path} is missing") from None
    if len(data) != tfile.length or hashlib.sha256(data).hexdigest() != tfile.hashes["sha256"]:
        raise RepositoryError(f"corrupt repository: {path} does not match rollout metadata")
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise RepositoryError(f"corrupt repository: {path} is not a JSON object")
    return doc


def list_channels(repo: LoadedRepo) -> list[str]:
    md = repo.delegated.get(ROLLOUT_ROLE)
    if md is None:
        return []
    return sorted(p[len("channels/") : -len(".json")] for p in md.signed.targets)


def write_channel(
    base: Path,
    doc: dict[str, Any],
    keys: Sequence[OperatorKey],
    expiry: RepoExpiry | None = None,
    now: datetime | None = None,
) -> None:
    """Sign and publish `channels/<channel>.json` with the (online) rollout key."""
    expiry = expiry or RepoExpiry()
    now = now or utc_now()
    channel = check_channel_name(str(doc.get("channel", "")))
    _check_key_expiry(keys, now)
    with repo_lock(base):
        repo = load_repo(base)
        _check_offline_roles_fresh(repo, now)
        release = doc.get("release") or {}
        target = release.get("target")
        published = {p.target: p for p in published_packages(repo)}
        if target not in published:
            raise UsageError(f"channel {channel!r}: {target!r} is not a published package")
        if published[target].name != doc.get("package"):
            raise UsageError(
                f"channel {channel!r} carries package {doc.get('package')!r}, "
                f"not {published[target].name!r}"
            )
        signers = _delegation_signers(repo, ROLLOUT_ROLE, keys)
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        if len(data) > MAX_CHANNEL_BYTES:
            raise UsageError(f"channel {channel!r}: document is larger than {MAX_CHANNEL_BYTES}")
        path = f"channels/{channel}.json"
        tfile = TargetFile.from_data(path, data, ["sha256"])
        write_atomic(_hashed_target_path(repo.targets_dir, path, tfile.hashes["sha256"]), data)
        _add_delegated_target(repo, ROLLOUT_ROLE, path, tfile, signers, keys, now, expiry)


# ---------------------------------------------------------------------------------------
# refresh and root rotation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefreshResult:
    resigned: tuple[str, ...]
    warnings: tuple[str, ...]


def _due(md: Metadata[Any], now: datetime, days: float, margin: float) -> bool:
    expires: datetime = md.signed.expires
    return bool(expires - now <= timedelta(days=days * margin))


def refresh_repo(
    base: Path,
    keys: Sequence[OperatorKey],
    expiry: RepoExpiry | None = None,
    now: datetime | None = None,
) -> RefreshResult:
    """Re-sign the timestamp (always) and any online role close to expiry; warn on offline roles."""
    expiry = expiry or RepoExpiry()
    now = now or utc_now()
    _check_key_expiry(keys, now)
    warnings: list[str] = []
    resigned: list[str] = []
    with repo_lock(base):
        repo = load_repo(base)
        for role, md in (("root", repo.root), ("targets", repo.targets)):
            if _due(md, now, expiry.days_for(role), 0.1):
                warnings.append(
                    f"{role} metadata expires {md.signed.expires.isoformat()}; "
                    f"re-sign it with the offline {role} key"
                )
        release = repo.delegated.get(RELEASE_ROLE)
        if release is not None and _due(release, now, expiry.release_days, 0.1):
            warnings.append(
                f"release metadata expires {release.signed.expires.isoformat()}; "
                "publish or re-sign it with the offline release keys"
            )
        changed: dict[str, int] = {}
        rollout = repo.delegated.get(ROLLOUT_ROLE)
        if rollout is not None and _due(
            rollout, now, expiry.rollout_days, expiry.refresh_margin_fraction
        ):
            rollout_role = _delegated_role(repo, ROLLOUT_ROLE)
            rollout.signed.version += 1
            rollout.signed.expires = _expiry(now, expiry.rollout_days)
            signers = _signers_for(rollout_role.keyids, rollout_role.threshold, keys, ROLLOUT_ROLE)
            _sign(rollout, signers)
            _write_metadata(repo.metadata_dir, ROLLOUT_ROLE, rollout)
            changed[ROLLOUT_ROLE] = rollout.signed.version
            resigned.append(ROLLOUT_ROLE)
        if changed or _due(
            repo.snapshot, now, expiry.snapshot_days, expiry.refresh_margin_fraction
        ):
            _write_snapshot_and_timestamp(repo, changed, keys, now, expiry)
            resigned += ["snapshot", "timestamp"]
        else:
            timestamp = repo.timestamp
            timestamp.signed.version += 1
            timestamp.signed.expires = _expiry(now, expiry.timestamp_days)
            _sign(timestamp, _top_signers(repo, "timestamp", keys))
            _write_metadata(repo.metadata_dir, "timestamp", timestamp)
            resigned.append("timestamp")
    for warning in warnings:
        log.warning("%s", warning)
    return RefreshResult(tuple(resigned), tuple(warnings))


def rotate_root_keys(
    base: Path,
    old_keys: Sequence[OperatorKey],
    new_root_keys: Sequence[OperatorKey],
    new_threshold: int = 1,
    expiry: RepoExpiry | None = None,
    now: datetime | None = None,
) -> int:
    """Write root N+1 that trusts new_root_keys, signed by the old threshold AND the new one.

    Devices holding root N verify N+1 with N's keys, then with N+1's own keys, so the chain
    stays unbroken; the old root keys can be destroyed afterwards. Returns the new version.
    """
    expiry = expiry or RepoExpiry()
    now = now or utc_now()
    with repo_lock(base):
        repo = load_repo(base)
        old_role = repo.root.signed.roles["root"]
        old_signers = _signers_for(old_role.keyids, old_role.threshold, old_keys, "root (old)")
        if not new_root_keys or not 1 <= new_threshold <= len(new_root_keys):
            raise UsageError(f"new root threshold {new_threshold} needs that many new root keys")
        new_signers: list[Signer] = []
        for key in new_root_keys:
            if key.signer is None:
                raise SignatureError(f"new root key {key.pub_path} has no private key beside it")
            new_signers.append(key.signer)
        root = repo.root.signed
        for keyid in list(old_role.keyids):
            root.revoke_key(keyid, "root")
        for key in new_root_keys:
            root.add_key(key.tuf_key, "root")
        root.roles["root"].threshold = new_threshold
        root.version += 1
        root.expires = _expiry(now, expiry.root_days)
        md = repo.root
        _sign(md, [*old_signers, *new_signers])
        _write_metadata(repo.metadata_dir, "root", md)
    log.info("root rotated to version %d", root.version)
    return root.version


def signers_of(keys: Sequence[OperatorKey]) -> list[CryptoSigner]:
    return [k.signer for k in keys if k.signer is not None]
