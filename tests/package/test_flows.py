"""End-to-end flows: build -> sign -> verify -> read (property test), key rotation, the CLI."""

# ruff: noqa: E501 - the case tables read best one case per line

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.errors import DowngradeError, SignatureError
from agent.package import (
    Keyring,
    apply_keyring_update,
    build_keyring,
    read_package,
    verify_package,
    write_keyring,
)
from agent.package.build import build_keyring_package, build_package, sign_package

from .conftest import DIGITS_ONNX, Forge, fixed_key, public_of

SCHEMA = """\
name: digits
version: 1.1.0
release_counter: 2
runtime: {kind: onnx, precision: fp32}
preprocess: {resize: [8, 8], layout: NCHW, color_order: GRAY, scale: 0.0625}
"""

_part = st.from_regex(r"[a-z0-9_][a-z0-9_.-]{0,11}", fullmatch=True)
_files = st.dictionaries(
    st.lists(_part, min_size=1, max_size=3).map("/".join).filter(
        lambda p: p not in ("model.onnx", "labels.txt") and not p.endswith((".yaml", ".yml",
                  ".npy", ".onnx", ".pkl", ".pickle", ".joblib"))
    ),
    st.binary(max_size=3000),
    max_size=5,
)  # fmt: skip


def _prefix_free(paths: list[str]) -> bool:
    return not any(q.startswith(p + "/") for p in paths for q in paths)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(files=_files, counter=st.integers(0, 2**40))
def test_round_trip_gives_back_the_same_files(
    files: dict[str, bytes], counter: int, forge: Forge, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if not _prefix_free(list(files)) or len({p.lower() for p in files}) != len(files):
        return
    work = tmp_path_factory.mktemp("rt")
    (work / "schema.yaml").write_text(SCHEMA)
    sources = {}
    for i, (name, data) in enumerate(files.items()):
        src = work / f"src{i}"
        src.write_bytes(data)
        sources[name] = src
    pkg, manifest = build_package(
        DIGITS_ONNX, work / "schema.yaml", work / "dist", release_counter=counter,
        extra_files=sources,
    )  # fmt: skip
    with pytest.raises(SignatureError):
        verify_package(pkg, forge.keyring)
    for signer in ("r3", "r1"):
        sign_package(pkg, forge.keys[signer])
    assert verify_package(pkg, forge.keyring) == manifest
    verified = read_package(pkg, forge.keyring, work / "staging", check_model=False)
    assert verified.manifest.release_counter == counter
    for name, data in files.items():
        assert (verified.root / name).read_bytes() == data
    assert (verified.root / "model.onnx").read_bytes() == DIGITS_ONNX.read_bytes()
    listed = {f.path for f in manifest.files} | {"manifest.json", "manifest.sig.json"}
    on_disk = {str(p.relative_to(verified.root)) for p in verified.root.rglob("*") if p.is_file()}
    assert on_disk == listed


def test_key_rotation_and_revocation(forge: Forge, tmp_path: Path) -> None:
    device_kr = tmp_path / "device" / "keyring"
    device_kr.mkdir(parents=True)
    for p in forge.keyring_dir.iterdir():
        (device_kr / p.name).write_bytes(p.read_bytes())
    r4 = fixed_key("edge-agent-test-r4")
    keys = {**forge.keys, "r4": r4}
    # New keyring: r1 is revoked (compromised), r4 joins; still 2 of 3.
    new_kr = build_keyring(
        [public_of(keys[k], "release") for k in ("r1", "r2", "r3", "r4")],
        {"release": 2},
        revoked=[keys["r1"].keyid, keys["rv"].keyid],
        version=2,
    )
    write_keyring(new_kr, tmp_path / "new-keyring")
    update, _ = build_keyring_package(tmp_path / "new-keyring", tmp_path / "dist", "2.0.0", 2)

    # Signed by one current key only: refused, keyring untouched.
    sign_package(update, keys["r2"])
    before = {p.name: p.read_bytes() for p in device_kr.iterdir()}
    with pytest.raises(SignatureError, match="1 valid release signature"):
        apply_keyring_update(update, device_kr)
    assert {p.name: p.read_bytes() for p in device_kr.iterdir()} == before

    # Signed only by the new key r4 (not yet trusted): still one valid.
    sign_package(update, keys["r4"])
    with pytest.raises(SignatureError):
        apply_keyring_update(update, device_kr)

    # The current threshold (r2 + r3) signs: applied.
    sign_package(update, keys["r3"])
    rotated = apply_keyring_update(update, device_kr)
    assert rotated.version == 2
    assert keys["r1"].keyid in rotated.revoked
    assert Keyring.load(device_kr).roles["release"].keyids == rotated.roles["release"].keyids

    # A package signed by r1 + r2 no longer verifies (r1 revoked); r2 + r4 does.
    pkg_old = tmp_path / "old.tar"
    pkg_old.write_bytes(forge.package(signers=("r1", "r2")))
    with pytest.raises(SignatureError, match="revoked"):
        verify_package(pkg_old, Keyring.load(device_kr))
    pkg_new = tmp_path / "new.tar"
    pkg_new.write_bytes(
        Forge(keys=keys, keyring_dir=device_kr, files=forge.files).package(signers=("r2", "r4"))
    )
    assert verify_package(pkg_new, Keyring.load(device_kr)).name == "digits"

    # Replaying the same update (same keyring version) is refused.
    with pytest.raises(DowngradeError, match="not newer"):
        apply_keyring_update(update, device_kr)
    assert not list(device_kr.parent.glob(".keyring.update*"))


def _run(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_operator_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, kr, dist = tmp_path / "keys", tmp_path / "keyring", tmp_path / "dist"
    for i in (1, 2, 3):
        assert (
            main(
                ["keys", "generate", "--role", "release", "--name", f"rel-{i}", "--out", str(keys)]
            )
            == 0
        )
    pubs = sorted(str(p) for p in keys.glob("*.pub.json"))
    assert main(["keys", "keyring", "--out", str(kr), "--threshold", "2", *pubs]) == 0
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    (tmp_path / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    assert main(["package", "build", "--model", str(DIGITS_ONNX), "--schema", str(tmp_path / "schema.yaml"),
                 "--labels", str(tmp_path / "labels.txt"), "--out", str(dist)]) == 0  # fmt: skip
    pkg = str(dist / "digits-1.1.0.tar")
    assert main(["package", "sign", pkg, "--key", str(keys / "rel-1.key")]) == 0
    capsys.readouterr()
    assert main(["package", "verify", pkg, "--keyring", str(kr)]) == 3
    assert "1 valid release signature(s) of 2 required" in capsys.readouterr().err
    assert main(["package", "sign", pkg, "--key", str(keys / "rel-2.key")]) == 0
    assert main(["package", "verify", pkg, "--keyring", str(kr)]) == 0
    assert "OK digits-1.1.0" in capsys.readouterr().out
    assert main(["package", "inspect", pkg, "--json", "--keyring", str(kr)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] is True and out["manifest"]["inputs"][0]["shape"] == [None, 1, 8, 8]
    assert main(["package", "inspect", pkg]) == 0
    assert "not checked: give --keyring" in capsys.readouterr().out


def test_cli_bad_input_is_one_error_line(tmp_path: Path) -> None:
    code, _, err = _run(
        "package", "verify", str(tmp_path / "missing.tar"), "--keyring", str(tmp_path)
    )
    assert code == 2 and err.strip().count("\n") == 0 and err.startswith("Error: ")
    (tmp_path / "schema.yaml").write_text(
        SCHEMA.replace(
            "runtime:", "inputs: [{name: input, dtype: float32, shape: [null, 1, 8, 9]}]\nruntime:"
        )
    )
    code, _, err = _run(
        "package",
        "build",
        "--model",
        str(DIGITS_ONNX),
        "--schema",
        str(tmp_path / "schema.yaml"),
        "--out",
        str(tmp_path),
    )
    assert code == 2, err
    assert "inputs[0].shape: [None, 1, 8, 9] declared, the model has [None, 1, 8, 8]" in err
    assert "Traceback" not in err
    code, out, _ = _run("package", "verify", "--help")
    assert code == 0 and "example:" in out
