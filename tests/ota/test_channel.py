"""Channel updates over a real TUF repository (the fleet's writer) served on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.errors import FetchError, RepositoryError
from agent.fleet.repo import refresh_repo, write_channel
from agent.ota import install
from agent.ota.channel import ChannelDocument
from agent.ota.download import TargetMismatchError
from agent.ota.membership import in_rollout, rollout_bucket
from agent.ota.states import OTAState

from .conftest import channel_doc as _channel
from .conftest import feed_frames
from .conftest import publish_release as _publish
from .conftest import repo_device as _repo_device


def test_membership_is_stable_across_stages() -> None:
    devices = [f"dev-{i}" for i in range(2000)]
    at = {p: {d for d in devices if in_rollout(d, "salt", p)} for p in (1.0, 10.0, 100.0)}
    assert at[1.0] <= at[10.0] <= at[100.0] and len(at[100.0]) == 2000
    assert 5 <= len(at[1.0]) <= 40 and 150 <= len(at[10.0]) <= 250
    assert rollout_bucket("dev-1", "a") != rollout_bucket("dev-1", "b")


def test_update_now_installs_then_is_up_to_date(tmp_path: Path, http_dir: Any) -> None:
    url, www, _ = http_dir
    dev = _repo_device(tmp_path, url, www)
    _publish(dev, www, "1.0.0", 1)
    svc = dev.service()
    result = svc.update_now()
    assert result.take and svc.journal.state() is OTAState.PROBATION
    feed_frames(svc, 20)
    _publish(dev, www, "1.1.0", 2, "digits_int8.onnx", precision="int8")
    svc.update_now()
    assert install.read_links(dev.state_dir) == install.Links("digits-1.1.0", "digits-1.0.0")
    feed_frames(svc, 20)
    again = svc.check()
    assert not again.take and again.reason == "up to date"
    assert svc.journal.mark("tuf.timestamp") >= 3


def test_not_in_rollout_paused_and_pinned(tmp_path: Path, http_dir: Any) -> None:
    url, www, _ = http_dir
    dev = _repo_device(tmp_path, url, www)
    salt = next(
        s for s in (f"x{i}" for i in range(999)) if rollout_bucket("test-device-1", s) >= 100
    )
    _publish(dev, www, "1.0.0", 1, percent=1.0, salt=salt)
    svc = dev.service()
    assert svc.check().reason.startswith("not in rollout")
    write_channel(
        www,
        _channel("1.0.0", 1, rollout={"percent": 100.0, "salt": salt, "paused": True}),
        dev.keys,
    )
    assert svc.check().reason == "rollout paused"
    assert svc.journal.state() is OTAState.IDLE


def test_replayed_metadata_is_refused(tmp_path: Path, http_dir: Any) -> None:
    url, www, _ = http_dir
    dev = _repo_device(tmp_path, url, www)
    _publish(dev, www, "1.0.0", 1)
    old = tmp_path / "old-metadata"
    shutil.copytree(www / "metadata", old)
    write_channel(www, _channel("1.0.0", 1, percent=50.0), dev.keys)
    svc = dev.service()
    svc.check()
    # The attacker serves yesterday's (validly signed) metadata again.
    shutil.rmtree(www / "metadata")
    shutil.copytree(old, www / "metadata")
    with pytest.raises(RepositoryError, match=r"replay|version"):
        svc.check()
    # Even with the device's cached TUF files wiped, the fsynced marks refuse it.
    for f in (dev.state_dir / "tuf").glob("*.json"):
        if f.name != "root.json":
            f.unlink()
    with pytest.raises(RepositoryError, match="replay"):
        svc.check()
    assert svc.journal.state() is OTAState.IDLE


def test_expired_metadata_is_refused_by_last_known_good_clock(
    tmp_path: Path, http_dir: Any
) -> None:
    url, www, _ = http_dir
    dev = _repo_device(tmp_path, url, www)
    _publish(dev, www, "1.0.0", 1)
    # Three days from now the device verifies the repository as it was then ...
    later = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=3)
    refresh_repo(www, dev.keys, now=later)
    ahead = dev.service(system_clock=lambda: later.timestamp() + 60)
    assert ahead.check().take
    assert ahead.journal.mark("clock.last_known_good_s") == int(later.timestamp() + 60)
    ahead.close()
    # ... then boots with a clock behind that and is served a timestamp (newer version)
    # that expired before the time it already saw: a stale boot clock must not win.
    refresh_repo(www, dev.keys)
    svc = dev.service()
    with pytest.raises(RepositoryError, match="expired"):
        svc.check()


def test_mark_an_older_agent_pushed_ahead_heals(tmp_path: Path, http_dir: Any) -> None:
    url, www, _ = http_dir
    dev = _repo_device(tmp_path, url, www)
    _publish(dev, www, "1.0.0", 1)
    svc = dev.service()
    assert svc.check().take
    # what an older agent did with a channel document dated a year ahead: no verified
    # timestamp allows that mark, so the next check lowers it and follows the repository
    ahead = datetime.now(timezone.utc) + timedelta(days=366)
    svc.journal.raise_mark("clock.last_known_good_s", int(ahead.timestamp()))
    assert svc.check().take
    assert svc.journal.mark("clock.last_known_good_s") < ahead.timestamp() - 300 * 86400


def test_channel_to_wrong_key_package_is_refused(tmp_path: Path, http_dir: Any) -> None:
    url, www, _ = http_dir
    dev = _repo_device(tmp_path, url, www)
    _publish(dev, www, "1.0.0", 1)
    svc = dev.service()
    svc.update_now()
    feed_frames(svc, 20)
    # The device's keyring trusts another release key than the repository's.
    from .conftest import make_key_dir, write_keyring

    other = make_key_dir(tmp_path / "other")
    shutil.rmtree(dev.state_dir / "keyring")
    write_keyring(other, dev.state_dir / "keyring")
    _publish(dev, www, "1.1.0", 2, "digits_int8.onnx", precision="int8")
    with pytest.raises(Exception, match=r"signature|key|trusted"):
        svc.update_now()
    assert svc.journal.state() is OTAState.REJECTED
    # Not retried while the channel is unchanged.
    assert svc.check().reason.startswith("refused earlier")
    assert install.read_links(dev.state_dir).current == "digits-1.0.0"


def test_network_cut_resumes_with_range(tmp_path: Path, http_dir: Any) -> None:
    url, www, faults = http_dir
    dev = _repo_device(tmp_path, url, www)
    _publish(dev, www, "1.0.0", 1)
    faults.update(targets="cut", cuts=2)
    svc = dev.service()
    svc.update_now()
    assert faults["cuts"] == 0 and svc.journal.state() is OTAState.PROBATION


def test_wrong_bytes_are_a_retryable_fetch_failure(tmp_path: Path, http_dir: Any) -> None:
    url, www, faults = http_dir
    dev = _repo_device(tmp_path, url, www)
    _publish(dev, www, "1.0.0", 1)
    faults.update(targets="wrong")
    svc = dev.service()
    with pytest.raises(TargetMismatchError, match="does not match the signed"):
        svc.update_now()
    # the network's bytes are not a verdict on the release: back to IDLE, nothing refused,
    # the bad file gone so the next poll downloads from byte 0
    assert svc.journal.state() is OTAState.IDLE
    assert svc.journal.last_refusal() is None
    assert not list((dev.state_dir / "staging").glob("digits-1.0.0.tar*"))
    faults.pop("targets")
    faults["requests"] = []
    assert svc.update_now().take and svc.journal.state() is OTAState.PROBATION
    package_gets = [r for r in faults["requests"] if "/targets/packages/" in r[0]]
    assert package_gets and all(rng is None for _, rng in package_gets)


def test_dripping_server_is_cut_off(tmp_path: Path, http_dir: Any) -> None:
    url, www, faults = http_dir
    from agent.ota.download import TargetRef, download_target
    from agent.ota.fetch import FetchLimits, HttpFetcher

    (www / "targets" / "packages").mkdir(parents=True)
    (www / "targets" / "packages" / "x.tar").write_bytes(b"x" * 5000)
    faults.update(targets="drip")
    http = HttpFetcher(FetchLimits(min_bytes_per_s=100.0, throughput_grace_s=1.0))
    ref = TargetRef(f"{url}/targets/packages/x.tar", 5000, "0" * 64, "x.tar")
    with pytest.raises(FetchError, match="too slow"):
        download_target(http, ref, tmp_path / "staging", attempts=1)


def test_channel_document_fields_are_checked() -> None:
    good = json.dumps(_channel("1.0.0", 1)).encode()
    assert ChannelDocument.parse(good, "x").version == "1.0.0"
    for bad in (
        b"[]",
        b"{",
        json.dumps({**_channel("1.0.0", 1), "release": {}}).encode(),
        json.dumps(_channel("1.0.0", 1, rollout={"percent": 200, "salt": "s"})).encode(),
    ):
        with pytest.raises(RepositoryError):
            ChannelDocument.parse(bad, "x")
