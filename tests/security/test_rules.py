"""The rules behind the attack table: the freshness clock, revert authorisations, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.errors import DowngradeError, SignatureError, UsageError
from agent.fleet.repo import RELEASE_ROLE, init_repo, load_repo, publish_package
from agent.fleet.rollout import start_rollout
from agent.ota.channel import LKG_MARK, LastKnownGoodClock
from agent.ota.journal import Journal
from agent.package import load_signing_key
from agent.package.keys import build_keyring, load_public_key_file
from agent.package.revert import (
    parse_revert,
    revert_bytes,
    revert_target,
    sign_revert_file,
    verify_revert,
)

from .attacks import H

# ------------------------------------------------------------------ the freshness clock


def test_clock_reference_is_the_system_clock_unless_behind_the_mark(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state.db")
    now = [1_000_000.0]
    clock = LastKnownGoodClock(journal, lambda: now[0])
    assert clock.reference_s() == 1_000_000.0 and clock.mark_s() == 0
    # verified at this reading, metadata expiring later: the reading becomes the mark
    clock.confirm(1_000_000.0, [1_086_400.0, 1_600_000.0])
    assert journal.mark(LKG_MARK) == 1_000_000
    now[0] = 10.0  # a Pi booting in 1970: expiry is judged at the mark
    assert clock.reference_s() == 1_000_000.0
    clock.confirm(10.0, [1_086_400.0])
    assert journal.mark(LKG_MARK) == 1_000_000  # never backwards
    # a reading past what the verified metadata allows is capped at its earliest expiry
    clock.confirm(9_000_000.0, [1_086_400.0, 5_000_000.0])
    assert journal.mark(LKG_MARK) == 1_086_400
    now[0] = 2_000_000.0
    assert clock.reference_s() == 2_000_000.0
    journal.close()


def test_a_failed_check_never_moves_the_mark(tmp_path: Path) -> None:
    from .attacks import world

    with world(tmp_path) as w:
        w.release("1.0.0", 1)
        w.clock.offset_s = 5 * 365 * 86400.0
        with pytest.raises(Exception, match="expired"):
            w.svc.check()
        assert w.mark_s() == 0
        w.clock.offset_s = 0.0
        assert w.svc.check().take
        assert 0 < w.mark_s() <= time.time()


# ------------------------------------------------------------------ revert authorisations


def _release_keys(tmp_path: Path, n: int = 2) -> tuple[list[Any], Any]:
    keys = H.make_key_dir(tmp_path / "keys", release_keys=n)
    release = [k for k in keys if k.role == "release"]
    pubs = [load_public_key_file(k.pub_path) for k in release]
    return keys, build_keyring(pubs, {"release": 2})


def _private(key: Any) -> Path:
    return key.pub_path.with_name(key.pub_path.name[: -len(".pub.json")] + ".key")


def test_revert_needs_the_release_threshold_over_its_exact_fields(tmp_path: Path) -> None:
    keys, keyring = _release_keys(tmp_path)
    k1, k2 = (k for k in keys if k.role == "release")
    path = tmp_path / "digits-1.0.0.revert.json"
    sign_revert_file(path, load_signing_key(_private(k1)), "digits", "1.0.0", 1, 2)
    with pytest.raises(SignatureError, match="1 valid release signature"):
        verify_revert(path.read_bytes(), keyring, "x")
    sign_revert_file(path, load_signing_key(_private(k2)))
    auth = verify_revert(path.read_bytes(), keyring, "x")
    assert (auth.package, auth.version, auth.release_counter, auth.max_floor) == (
        "digits",
        "1.0.0",
        1,
        2,
    )
    assert auth.allows("digits", "1.0.0", 1, 2)
    assert not auth.allows("digits", "1.0.0", 1, 3)  # the fleet moved past it
    assert not auth.allows("other", "1.0.0", 1, 2)
    assert not auth.allows("digits", "1.0.0", 0, 2)
    with pytest.raises(DowngradeError, match="covers floors up to 2"):
        auth.check("digits", "1.0.0", 1, 3)
    # the signatures cover every field: a raised max_floor no longer verifies
    _, sigs = parse_revert(path.read_bytes(), "x")
    forged = revert_bytes(type(auth)(**{**auth.__dict__, "max_floor": 99}), sigs)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_revert(forged, keyring, "x")
    doc = json.loads(path.read_bytes())
    doc["revert"]["extra"] = 1
    with pytest.raises(SignatureError, match="expected the fields"):
        verify_revert(json.dumps(doc).encode(), keyring, "x")
    with pytest.raises(UsageError, match="must be above"):
        sign_revert_file(
            tmp_path / "bad.revert.json", load_signing_key(_private(k1)), "d", "1.0.0", 2, 2
        )


def test_sign_revert_publish_and_rollout_back_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, _ = _release_keys(tmp_path)
    k1, k2 = (k for k in keys if k.role == "release")
    www = tmp_path / "repo"
    init_repo(www, keys, release_threshold=2)
    for version, counter in (("1.0.0", 1), ("1.1.0", 2)):
        tar = H.build_package(
            tmp_path / "dist",
            [k1, k2],
            version,
            counter,
            (H.DEMO / "digits_fp32.onnx").read_bytes(),
        )
        publish_package(www, tar, keys)
    start_rollout(www, "stable", "1.1.0", keys, package="digits")
    with pytest.raises(UsageError, match="needs a revert signed by the release keys"):
        start_rollout(www, "stable", "1.0.0", keys)
    dist = tmp_path / "dist"
    common = ["--release-counter", "1", "--max-floor", "2", "--out", str(dist)]
    sign = ["package", "sign-revert", "--package", "digits", "--version", "1.0.0", *common]
    assert main([*sign, "--key", str(_private(k1))]) == 0
    revert = dist / "digits-1.0.0.revert.json"
    assert "(1 signature(s))" in capsys.readouterr().out
    publish = ["publish", str(revert), "--repo", str(www), "--keys", str(tmp_path / "keys")]
    assert main(publish) == 3  # one of two release signatures: refused, repository unchanged
    assert "Error:" in capsys.readouterr().err
    assert (
        revert_target("digits", "1.0.0")
        not in load_repo(www).delegated[RELEASE_ROLE].signed.targets
    )
    assert main([*sign, "--key", str(_private(k2))]) == 0
    assert "(2 signature(s))" in capsys.readouterr().out
    assert main(publish) == 0
    assert "published revert to digits 1.0.0" in capsys.readouterr().out
    repo = load_repo(www)
    assert revert_target("digits", "1.0.0") in repo.delegated[RELEASE_ROLE].signed.targets
    # a revert file is no package: publish still lists only the two releases
    state = start_rollout(www, "stable", "1.0.0", keys)
    assert state.version == "1.0.0" and state.release_counter == 1
    with pytest.raises(SystemExit):
        main(["package", "sign-revert", "--help"])
    assert "example:" in capsys.readouterr().out


def test_repo_init_signs_empty_delegated_roles(tmp_path: Path) -> None:
    keys, _ = _release_keys(tmp_path)
    www = tmp_path / "repo"
    init_repo(www, keys, release_threshold=2)
    repo = load_repo(www)
    assert set(repo.delegated) == {"release", "rollout"}
    assert all(md.signed.version == 1 and not md.signed.targets for md in repo.delegated.values())
    assert {"release.json", "rollout.json"} <= set(repo.snapshot.signed.meta)
    # the release threshold signed the empty release role, as it will sign every version
    assert len(repo.delegated["release"].signatures) == 2
