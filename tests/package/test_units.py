"""Semver, manifest schema errors, key files, the release floor (with SIGKILL) and compat."""

# ruff: noqa: E501 - the case tables read best one case per line

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ConfigError, DowngradeError, ManifestError, UsageError
from agent.package import (
    Keyring,
    ReleaseFloor,
    generate_key,
    load_public_key_file,
    load_signing_key,
    parse_manifest,
    parse_version,
)

from .conftest import Forge


@pytest.mark.parametrize(
    "lower,higher",
    [
        ("1.0.0", "2.0.0"),
        ("1.9.0", "1.10.0"),
        ("1.0.0-alpha", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-alpha.1"),
        ("1.0.0-alpha.1", "1.0.0-alpha.beta"),
        ("1.0.0-beta.2", "1.0.0-beta.11"),
        ("1.0.0-rc.1", "1.0.0"),
    ],
)
def test_semver_precedence(lower: str, higher: str) -> None:
    assert parse_version(lower) < parse_version(higher)
    assert not parse_version(higher) < parse_version(lower)


def test_semver_build_metadata_is_ignored_and_text_round_trips() -> None:
    assert parse_version("1.2.3+abc") == parse_version("1.2.3+def")
    assert str(parse_version("1.2.3-rc.1+b.5")) == "1.2.3-rc.1+b.5"


@pytest.mark.parametrize("bad", ["1.0", "01.0.0", "1.0.0-", "v1.0.0", "1.0.0-01", "", "1.0.0 "])
def test_semver_refuses(bad: str) -> None:
    with pytest.raises(ManifestError, match="not a semantic version"):
        parse_version(bad)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["files"][1].update(sha256="abc"), "manifest.json: files[1].sha256: expected 64 hex chars"),
        (lambda d: d.update(release_counter="3"), "manifest.json: release_counter: expected an integer, got a string"),
        (lambda d: d.pop("name"), "manifest.json: name: missing"),
        (lambda d: d.update(name="Digits!"), "manifest.json: name: 'Digits!' does not match"),
        (lambda d: d.update(created="yesterday"), "manifest.json: created: 'yesterday' does not match"),
        (lambda d: d["inputs"][0].update(dtype="float128"), "manifest.json: inputs[0].dtype: expected one of"),
        (lambda d: d["inputs"][0]["shape"].__setitem__(1, 0), "manifest.json: inputs[0].shape[1]: 0 is outside"),
        (lambda d: d.update(gate={"accuracy_drop_max_pp": "a"}), "manifest.json: gate.accuracy_drop_max_pp: expected a number"),
        (lambda d: d.update(gate={"loosen_everything": 1}), "manifest.json: gate.loosen_everything: unknown key"),
        (lambda d: d.pop("runtime"), "manifest.json: runtime: missing (required for task 'classification')"),
        (lambda d: d["files"].append(dict(d["files"][0], path="LABELS.TXT")), "manifest.json: files[2].path: duplicate path"),
        (lambda d: d.update(preprocess={"std": [0.0]}), "manifest.json: preprocess.std[0]: must be above 0"),
    ],
)  # fmt: skip
def test_manifest_errors_name_the_path(forge: Forge, edit: object, message: str) -> None:
    doc = forge.manifest()
    edit(doc)  # type: ignore[operator]
    with pytest.raises(ManifestError) as info:
        parse_manifest(json.dumps(doc).encode())
    assert message in str(info.value)


def test_manifest_round_trips_through_to_dict(forge: Forge) -> None:
    doc = forge.manifest(gate={"accuracy_drop_max_pp": 0.2}, **{"x-note": "hi"})
    m = parse_manifest(json.dumps(doc).encode())
    assert parse_manifest(json.dumps(m.to_dict()).encode()) == m
    assert m.gate == {"accuracy_drop_max_pp": 0.2}
    assert m.extensions == {"x-note": "hi"}
    assert m.package_id == "digits-1.1.0"


def test_generate_key_files(tmp_path: Path) -> None:
    key_path, pub_path, keyid = generate_key("release", tmp_path, "rel-1")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    pub = load_public_key_file(pub_path)
    assert pub.keyid == keyid and pub.role == "release"
    assert load_signing_key(key_path).keyid == keyid
    with pytest.raises(UsageError, match="already exists"):
        generate_key("release", tmp_path, "rel-1")


def test_encrypted_key_needs_the_passphrase(tmp_path: Path) -> None:
    key_path, _, keyid = generate_key("rollout", tmp_path, passphrase=b"s3cret")
    assert b"ENCRYPTED" in key_path.read_bytes()
    assert load_signing_key(key_path, b"s3cret").keyid == keyid
    with pytest.raises(UsageError, match="key is encrypted"):
        load_signing_key(key_path)
    with pytest.raises(UsageError, match="wrong passphrase"):
        load_signing_key(key_path, b"nope")


def test_keyring_refuses_tampered_public_key(forge: Forge, tmp_path: Path) -> None:
    kr = tmp_path / "kr"
    kr.mkdir()
    for p in forge.keyring_dir.iterdir():
        (kr / p.name).write_bytes(p.read_bytes())
    victim = sorted(kr.glob("*.pub.json"))[0]
    doc = json.loads(victim.read_text())
    doc["public"] = "00" * 32
    victim.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="keyid does not match the public key"):
        Keyring.load(kr)


def test_keyring_threshold_above_usable_keys_is_refused(forge: Forge, tmp_path: Path) -> None:
    kr = tmp_path / "kr"
    kr.mkdir()
    for p in forge.keyring_dir.iterdir():
        (kr / p.name).write_bytes(p.read_bytes())
    doc = json.loads((kr / "keyring.json").read_text())
    doc["roles"]["release"]["threshold"] = 4  # 4 listed, one of them revoked
    (kr / "keyring.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="threshold: 4 but only 3 unrevoked"):
        Keyring.load(kr)


def test_release_floor_only_rises(tmp_path: Path) -> None:
    with ReleaseFloor(tmp_path / "state.db") as floor:
        assert floor.get("digits") is None
        floor.check("digits", 0)
        assert floor.raise_to("digits", 5, "1.5.0") == 5
        assert floor.raise_to("digits", 3, "1.3.0") == 5
        floor.check("digits", 5)
        with pytest.raises(
            DowngradeError, match="release_counter 4 is below this device's floor 5"
        ):
            floor.check("digits", 4)
        floor.check("digits", 4, allow_revert=True)
        assert floor.get("other") is None
        mode = floor._db.execute("PRAGMA synchronous").fetchone()[0]
        assert mode == 2  # FULL


CHILD = """
import os, sys
from pathlib import Path
from agent.package import ReleaseFloor
floor = ReleaseFloor(Path(sys.argv[1]))
floor.raise_to("digits", 7, "1.7.0")
print("raised", flush=True)
sys.stdin.read()
"""


def test_release_floor_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "raised"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with ReleaseFloor(db) as floor:
        assert floor.get("digits") == 7
