"""The TUF repository: publish checks, atomic refusals, a device client, tampering, rotation."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fleet_testlib import (
    build_package,
    device_fetch_channel,
    make_key_dir,
    provision_device,
    static_server,
    tree_digest,
)

from agent.errors import (
    DowngradeError,
    EdgeAgentError,
    RepositoryError,
    SignatureError,
    UsageError,
)
from agent.fleet.keys import OperatorKey, load_key_dir
from agent.fleet.repo import (
    RepoExpiry,
    init_repo,
    load_repo,
    publish_package,
    published_packages,
    refresh_repo,
    rotate_root_keys,
)
from agent.fleet.rollout import RolloutPolicy, start_rollout


def _release(keys: list[OperatorKey]) -> list[OperatorKey]:
    return [k for k in keys if k.role == "release"]


@pytest.fixture()
def repo(tmp_path: Path, operator_keys: list[OperatorKey]) -> Path:
    base = tmp_path / "repo"
    init_repo(base, operator_keys, release_threshold=2)
    pkg = build_package(tmp_path / "pkgs", _release(operator_keys), version="1.0.0")
    publish_package(base, pkg, operator_keys)
    start_rollout(base, "stable", "1.0.0", operator_keys, RolloutPolicy(), package="digits")
    return base


def test_device_client_reads_published_channel_and_package(
    repo: Path, tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    state = tmp_path / "device"
    provision_device(state, repo)
    with static_server(repo) as url:
        got = device_fetch_channel(state, url)
    assert got.document.version == "1.0.0"
    assert got.document.percent == 1.0
    published = published_packages(load_repo(repo), "digits")[0]
    assert got.package.sha256 == published.sha256
    assert got.package.url.endswith(f"/targets/packages/{published.sha256}.digits-1.0.0.tar")


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("unsigned", SignatureError),
        ("under_signed", SignatureError),
        ("untrusted_signer", SignatureError),
        ("same_version", DowngradeError),
        ("lower_version", DowngradeError),
        ("counter_not_raised", DowngradeError),
        ("channel_name_mismatch", UsageError),
        ("release_key_missing", SignatureError),
        ("expired_key", SignatureError),
        ("expired_targets", RepositoryError),
        ("corrupt_snapshot", RepositoryError),
        ("bad_signature_on_release_metadata", RepositoryError),
        ("not_a_tar", EdgeAgentError),
    ],
)
def test_publish_refusals_leave_repository_unchanged(
    case: str,
    error: type[Exception],
    repo: Path,
    tmp_path: Path,
    operator_keys: list[OperatorKey],
) -> None:
    keys = operator_keys
    release = _release(keys)
    out = tmp_path / "bad"
    now = None
    kwargs: dict[str, object] = {}
    if case == "unsigned":
        pkg = build_package(out, [], version="1.1.0", release_counter=2)
    elif case == "under_signed":
        pkg = build_package(out, release[:1], version="1.1.0", release_counter=2)
    elif case == "untrusted_signer":
        stranger = make_key_dir(tmp_path / "stranger")
        pkg = build_package(out, _release(stranger), version="1.1.0", release_counter=2)
    elif case == "same_version":
        pkg = build_package(out, release, version="1.0.0", release_counter=2)
    elif case == "lower_version":
        pkg = build_package(out, release, version="0.9.0", release_counter=2)
    elif case == "counter_not_raised":
        pkg = build_package(out, release, version="1.1.0", release_counter=1)
    elif case == "channel_name_mismatch":
        pkg = build_package(out, release, name="other", version="1.0.0")
        kwargs["channel"] = "stable"
    elif case == "release_key_missing":
        pkg = build_package(out, release, version="1.1.0", release_counter=2)
        online = tmp_path / "online"
        shutil.copytree(keys[0].pub_path.parent, online)
        for key_file in online.glob("release-*.key"):
            key_file.unlink()
        keys = load_key_dir(online)
    elif case == "expired_key":
        pkg = build_package(out, release, version="1.1.0", release_counter=2)
        folder = tmp_path / "expiring"
        shutil.copytree(keys[0].pub_path.parent, folder)
        pub = folder / "snapshot.pub.json"
        doc = json.loads(pub.read_text())
        doc["expires"] = "2020-01-01T00:00:00Z"
        pub.write_text(json.dumps(doc))
        keys = load_key_dir(folder)
    elif case == "expired_targets":
        pkg = build_package(out, release, version="1.1.0", release_counter=2)
        now = datetime.now(timezone.utc) + timedelta(days=400)
    elif case == "corrupt_snapshot":
        pkg = build_package(out, release, version="1.1.0", release_counter=2)
        snap = sorted((repo / "metadata").glob("*.snapshot.json"))[-1]
        snap.write_text(snap.read_text()[:-40])
    elif case == "bad_signature_on_release_metadata":
        pkg = build_package(out, release, version="1.1.0", release_counter=2)
        # repo init wrote an empty 1.release.json; the first publish made version 2
        rel = repo / "metadata" / "2.release.json"
        doc = json.loads(rel.read_text())
        doc["signed"]["targets"]["packages/digits-1.0.0.tar"]["length"] += 1
        rel.write_text(json.dumps(doc))
    elif case == "not_a_tar":
        pkg = out / "digits-1.1.0.tar"
        out.mkdir()
        pkg.write_bytes(b"this is not a tar archive" * 100)
    before = tree_digest(repo)
    with pytest.raises(error) as info:
        publish_package(repo, pkg, keys, now=now, **kwargs)  # type: ignore[arg-type]
    assert str(info.value).strip() and "\n" not in str(info.value)
    assert tree_digest(repo) == before


def test_publish_higher_version_then_offline_release_key_folder_not_needed_for_channels(
    repo: Path, tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    pkg = build_package(tmp_path / "p", _release(operator_keys), version="1.1.0", release_counter=2)
    published = publish_package(repo, pkg, operator_keys, channel="stable")
    assert published.version == "1.1.0"
    # The server holds only online private keys: rollout, snapshot, timestamp.
    online = tmp_path / "online"
    online.mkdir()
    for key in operator_keys:
        shutil.copy(key.pub_path, online / key.pub_path.name)
        if key.role in ("rollout", "snapshot", "timestamp"):
            stem = key.pub_path.name[: -len(".pub.json")]
            shutil.copy(key.pub_path.with_name(stem + ".key"), online / f"{stem}.key")
    online_keys = load_key_dir(online)
    start_rollout(repo, "stable", "1.1.0", online_keys)
    refresh_repo(repo, online_keys)
    state = tmp_path / "device"
    provision_device(state, repo)
    with static_server(repo) as url:
        assert device_fetch_channel(state, url).document.version == "1.1.0"


def _tamper_channel_file(repo: Path) -> None:
    path = next((repo / "targets" / "channels").glob("*.stable.json"))
    doc = json.loads(path.read_text())
    doc["rollout"]["percent"] = 100.0
    path.write_text(json.dumps(doc))


def _tamper_timestamp_unsigned(repo: Path) -> None:
    path = repo / "metadata" / "timestamp.json"
    doc = json.loads(path.read_text())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    path.write_text(json.dumps(doc))


def _tamper_release_metadata(repo: Path) -> None:
    path = sorted((repo / "metadata").glob("*.release.json"))[-1]
    doc = json.loads(path.read_text())
    doc["signed"]["targets"]["packages/digits-1.0.0.tar"]["hashes"]["sha256"] = "0" * 64
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "tamper", [_tamper_channel_file, _tamper_timestamp_unsigned, _tamper_release_metadata]
)
def test_device_client_refuses_tampered_repository(
    tamper: object, repo: Path, tmp_path: Path
) -> None:
    state = tmp_path / "device"
    provision_device(state, repo)
    tamper(repo)  # type: ignore[operator]
    with static_server(repo) as url, pytest.raises(RepositoryError):
        device_fetch_channel(state, url)


def test_device_client_refuses_replayed_timestamp(
    repo: Path, tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    state = tmp_path / "device"
    provision_device(state, repo)
    old_timestamp = (repo / "metadata" / "timestamp.json").read_bytes()
    refresh_repo(repo, operator_keys)
    with static_server(repo) as url:
        device_fetch_channel(state, url)
        (repo / "metadata" / "timestamp.json").write_bytes(old_timestamp)
        with pytest.raises(RepositoryError):
            device_fetch_channel(state, url)


def test_refresh_resigns_timestamp_and_online_roles_near_expiry(
    repo: Path, operator_keys: list[OperatorKey]
) -> None:
    before = load_repo(repo)
    result = refresh_repo(repo, operator_keys)
    after = load_repo(repo)
    assert result.resigned == ("timestamp",)
    assert after.timestamp.signed.version == before.timestamp.signed.version + 1
    assert after.snapshot.signed.version == before.snapshot.signed.version
    # Six days on, the 7-day snapshot and (past half of 30 days? no) are due; 20 days on,
    # the rollout role is due too, and root/targets are far from expiry: no warnings.
    later = datetime.now(timezone.utc) + timedelta(days=20)
    result = refresh_repo(repo, operator_keys, now=later)
    assert set(result.resigned) == {"rollout", "snapshot", "timestamp"}
    assert result.warnings == ()
    near_end = datetime.now(timezone.utc) + timedelta(days=340)
    result = refresh_repo(repo, operator_keys, now=near_end)
    assert any("root metadata expires" in w for w in result.warnings)


def test_root_rotation_keeps_provisioned_devices_updating(
    repo: Path, tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    state = tmp_path / "device"
    provision_device(state, repo)  # trusts root version 1 only
    new_root = make_key_dir(tmp_path / "new-root-keys")
    new_root_keys = [k for k in new_root if k.role == "root"]
    assert rotate_root_keys(repo, operator_keys, new_root_keys) == 2
    pkg = build_package(tmp_path / "p", _release(operator_keys), version="1.1.0", release_counter=2)
    publish_package(repo, pkg, operator_keys)
    start_rollout(repo, "stable", "1.1.0", operator_keys)
    with static_server(repo) as url:
        assert device_fetch_channel(state, url).document.version == "1.1.0"
    trusted = json.loads((state / "tuf" / "root.json").read_text())
    assert trusted["signed"]["version"] == 2
    assert set(trusted["signed"]["roles"]["root"]["keyids"]) == {k.keyid for k in new_root_keys}
    # The old root key alone can no longer rotate the root.
    with pytest.raises(SignatureError):
        rotate_root_keys(repo, operator_keys, new_root_keys)


def test_root_signed_only_by_new_keys_is_refused_by_devices(
    repo: Path, tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    """An attacker holding a new key but not the old threshold cannot take over the root."""
    state = tmp_path / "device"
    provision_device(state, repo)
    new_root_keys = [k for k in make_key_dir(tmp_path / "evil") if k.role == "root"]
    rotate_root_keys(repo, operator_keys, new_root_keys)
    path = repo / "metadata" / "2.root.json"
    doc = json.loads(path.read_text())
    doc["signatures"] = [s for s in doc["signatures"] if s["keyid"] == new_root_keys[0].keyid]
    path.write_text(json.dumps(doc))
    with static_server(repo) as url, pytest.raises(RepositoryError):
        device_fetch_channel(state, url)
    with pytest.raises(RepositoryError):
        load_repo(repo)


def test_init_refuses_existing_repository_and_missing_roles(
    repo: Path, tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    with pytest.raises(UsageError):
        init_repo(repo, operator_keys)
    only_release = [k for k in operator_keys if k.role == "release"]
    with pytest.raises(EdgeAgentError, match="no root key"):
        init_repo(tmp_path / "other", only_release)
    with pytest.raises(UsageError, match="release threshold"):
        init_repo(tmp_path / "third", operator_keys, release_threshold=3)


def test_short_expiry_metadata_is_refused_once_expired(
    tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    base = tmp_path / "repo"
    expiry = RepoExpiry(timestamp_days=1.0)
    past = datetime.now(timezone.utc) - timedelta(days=3)
    init_repo(base, operator_keys, release_threshold=2, expiry=expiry, now=past)
    pkg = build_package(tmp_path / "p", _release(operator_keys))
    publish_package(base, pkg, operator_keys, now=past)
    start_rollout(base, "stable", "1.0.0", operator_keys, package="digits", now=past)
    state = tmp_path / "device"
    provision_device(state, base)
    with static_server(base) as url:
        with pytest.raises(RepositoryError, match="expired"):
            device_fetch_channel(state, url)
        refresh_repo(base, operator_keys)  # the cron job fixes it
        assert device_fetch_channel(state, url).document.version == "1.0.0"
