"""The hostile corpus: every malicious or broken package is refused with its exact error."""

# ruff: noqa: E501 - the case tables read best one case per line

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.errors import (
    CompatibilityError,
    DowngradeError,
    EdgeAgentError,
    IntegrityError,
    ManifestError,
    PackageError,
    SignatureError,
    UnsafePackageError,
)
from agent.package import ReadLimits, ReleaseFloor, check_compat, read_package, verify_package
from agent.package.manifest import Manifest
from agent.package.tarstream import END_OF_ARCHIVE, tar_header

from .conftest import Forge, Member, npy_bytes, tree_snapshot

GIB = 1 << 30


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Forge], bytes]
    error: type[EdgeAgentError]
    fragment: str
    limits: ReadLimits | None = None


def _with_files(f: Forge, extra: dict[str, bytes], **overrides: object) -> bytes:
    files = {**f.files, **extra}
    return f.package(files=files, manifest=f.manifest(files, **overrides))


def _edit_manifest(f: Forge, **overrides: object) -> bytes:
    return f.package(manifest=f.manifest(**overrides))


def _replace_member(name: str, new: Member) -> Callable[[list[Member]], list[Member]]:
    return lambda ms: [new if m.name == name else m for m in ms]


def _insert(member: Member, at: int = 2) -> Callable[[list[Member]], list[Member]]:
    return lambda ms: [*ms[:at], member, *ms[at:]]


def _manifest_raw(f: Forge, raw: bytes) -> bytes:
    return f.package(manifest_raw=raw)


def _yaml_bomb() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return ("\n".join(lines) + "\n").encode()


def _onnx_external(f: Forge) -> bytes:
    model = onnx.load_from_string(f.files["model.onnx"])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    return bytes(model.SerializeToString())


def _truncate(data: bytes, at: int) -> bytes:
    return data[:at]


def _pax(f: Forge) -> bytes:
    pax = Member("PaxHeader/model.onnx", b"30 path=../../../tmp/evil.txt\n", typeflag=b"x")
    return f.package(edit_members=_insert(pax))


def _v7_header(f: Forge) -> bytes:
    good = f.package()
    header = bytearray(good[:512])
    header[257:265] = bytes(8)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header) + good[512:]


def _bad_checksum_later(f: Forge) -> bytes:
    data = bytearray(f.package())
    # Third header: after manifest and signature members (each padded to 512).
    offset = 0
    for _ in range(2):
        size = int(data[offset + 124 : offset + 135], 8)
        offset += 512 + (size + 511) // 512 * 512
    data[offset + 5] ^= 0x01
    return bytes(data)


def _base256_size(f: Forge) -> bytes:
    def edit(ms: list[Member]) -> list[Member]:
        return ms

    raw = bytearray(f.package(edit_members=edit))
    offset = 0
    for _ in range(2):
        size = int(raw[offset + 124 : offset + 135], 8)
        offset += 512 + (size + 511) // 512 * 512
    raw[offset + 124 : offset + 136] = b"\x80" + bytes(10) + b"\x10"
    raw[offset + 148 : offset + 156] = b" " * 8
    raw[offset + 148 : offset + 156] = b"%06o\x00 " % sum(raw[offset : offset + 512])
    return bytes(raw)


def _sig_over_other(f: Forge) -> bytes:
    other = (json.dumps(f.manifest(release_counter=99), indent=2) + "\n").encode()
    return f.package(sig_raw=f.sign(other))


def _edited_after_signing(f: Forge) -> bytes:
    raw = (json.dumps(f.manifest(), indent=2) + "\n").encode()
    sig = f.sign(raw)
    return f.package(
        manifest_raw=raw.replace(b'"release_counter": 3', b'"release_counter": 9'), sig_raw=sig
    )


def _sig_doc(sigs: object) -> bytes:
    return json.dumps({"signatures": sigs}).encode()


CASES = [
    # --- signatures and trust ---
    Case("unsigned", lambda f: f.package(signers=()), SignatureError, "0 valid release signature(s) of 2"),
    Case("threshold_not_met", lambda f: f.package(signers=("r1",)), SignatureError, "1 valid release signature(s) of 2"),
    Case("wrong_key", lambda f: f.package(signers=("r1", "x1")), SignatureError, "not a trusted release key"),
    Case("same_key_twice", lambda f: f.package(signers=("r1", "r1")), SignatureError, "signed twice"),
    Case("revoked_key", lambda f: f.package(signers=("r1", "rv")), SignatureError, "is revoked"),
    Case("rollout_key_on_package", lambda f: f.package(signers=("r1", "ro1")), SignatureError, "not a trusted release key"),
    Case("signature_over_other_bytes", _sig_over_other, SignatureError, "bad signature over manifest.json"),
    Case("manifest_edited_after_signing", _edited_after_signing, SignatureError, "bad signature"),
    Case("signature_not_base64", lambda f: f.package(sig_raw=_sig_doc([{"keyid": f.keys["r1"].keyid, "sig": "!!"}])), SignatureError, "not base64"),
    Case("signature_truncated", lambda f: f.package(sig_raw=_sig_doc([{"keyid": f.keys["r1"].keyid, "sig": "AAAA"}, {"keyid": f.keys["r2"].keyid, "sig": "AAAA"}])), SignatureError, "bad signature"),
    Case("signatures_not_json", lambda f: f.package(sig_raw=b"{not json"), SignatureError, "invalid JSON"),
    Case("signatures_wrong_shape", lambda f: f.package(sig_raw=b'{"sigs": []}'), SignatureError, "expected"),
    Case("too_many_signatures", lambda f: f.package(sig_raw=_sig_doc([{"keyid": "00", "sig": ""}] * 65)), SignatureError, "more than 64"),
    Case("signatures_huge", lambda f: f.package(sig_raw=b" " * (70 << 10)), UnsafePackageError, "manifest.sig.json: 71680 bytes, more than"),
    Case("signatures_missing", lambda f: f.package(edit_members=lambda ms: [ms[0], *ms[2:]]), UnsafePackageError, "second member must be manifest.sig.json"),
    # --- archive structure ---
    Case("not_a_tar", lambda f: bytes(range(256)) * 16, PackageError, "not a tar archive"),
    Case("empty_file", lambda f: b"", PackageError, "the file is empty"),
    Case("truncated_mid_file", lambda f: _truncate(f.package(), len(f.package()) - 5000), PackageError, "truncated package"),
    Case("truncated_no_end_marker", lambda f: f.package(tail=b""), PackageError, "no end-of-archive marker"),
    Case("manifest_not_first", lambda f: f.package(edit_members=lambda ms: [ms[2], ms[0], ms[1], *ms[3:]]), UnsafePackageError, "first member must be manifest.json"),
    Case("manifest_huge", lambda f: f.package(manifest_raw=b" " * (2 << 20)), UnsafePackageError, "manifest.json: 2097152 bytes, more than"),
    Case("package_over_cap", lambda f: _with_files(f, {"big.bin": bytes(50_000)}), UnsafePackageError, "more than the 40000 allowed", ReadLimits(max_package_bytes=40_000)),
    Case("bad_header_checksum", _bad_checksum_later, PackageError, "bad header checksum"),
    Case("not_ustar", _v7_header, PackageError, "not a ustar archive"),
    Case("pax_header", _pax, UnsafePackageError, "pax extended header"),
    Case("gnu_longname", lambda f: f.package(edit_members=_insert(Member("././@LongLink", b"../../evil\x00", typeflag=b"L"))), UnsafePackageError, "GNU long name"),
    Case("base256_size", _base256_size, UnsafePackageError, "base-256"),
    Case("trailing_garbage", lambda f: f.package(tail=END_OF_ARCHIVE + b"MZ" * 100), UnsafePackageError, "data after the end of the archive"),
    # --- members ---
    Case("hash_mismatch", lambda f: f.package(edit_members=_replace_member("labels.txt", Member("labels.txt", b"X" + f.files["labels.txt"][1:]))), IntegrityError, "labels.txt: sha256 mismatch"),
    Case("size_mismatch", lambda f: f.package(edit_members=_replace_member("labels.txt", Member("labels.txt", b"0\n1\n"))), IntegrityError, "labels.txt: 4 bytes in the archive, manifest.json says 20"),
    Case("missing_file", lambda f: f.package(edit_members=lambda ms: [m for m in ms if m.name != "labels.txt"]), IntegrityError, "labels.txt: listed in manifest.json but missing"),
    Case("extra_file", lambda f: f.package(edit_members=_insert(Member("evil.sh", b"#!/bin/sh\n"))), UnsafePackageError, "evil.sh: not listed in manifest.json"),
    Case("path_traversal", lambda f: f.package(edit_members=_insert(Member("../evil.txt", b"x"))), UnsafePackageError, "path with '..'"),
    Case("path_traversal_nested", lambda f: f.package(edit_members=_insert(Member("a/../../evil.txt", b"x"))), UnsafePackageError, "path with '..'"),
    Case("absolute_path", lambda f: f.package(edit_members=_insert(Member("/tmp/evil.txt", b"x"))), UnsafePackageError, "absolute path"),
    Case("backslash_path", lambda f: f.package(edit_members=_insert(Member("..\\evil.txt", b"x"))), UnsafePackageError, "backslash"),
    Case("dot_slash_name", lambda f: f.package(edit_members=_replace_member("labels.txt", Member("./labels.txt", f.files["labels.txt"]))), UnsafePackageError, "path part '.'"),
    Case("symlink", lambda f: f.package(edit_members=_replace_member("labels.txt", Member("labels.txt", typeflag=b"2", linkname="/etc/passwd"))), UnsafePackageError, "labels.txt: a symlink"),
    Case("hardlink", lambda f: f.package(edit_members=_replace_member("labels.txt", Member("labels.txt", typeflag=b"1", linkname="/etc/shadow"))), UnsafePackageError, "labels.txt: a hardlink"),
    Case("char_device", lambda f: f.package(edit_members=_insert(Member("null", typeflag=b"3"))), UnsafePackageError, "null: a character device"),
    Case("block_device", lambda f: f.package(edit_members=_insert(Member("sda", typeflag=b"4"))), UnsafePackageError, "sda: a block device"),
    Case("fifo", lambda f: f.package(edit_members=_insert(Member("pipe", typeflag=b"6"))), UnsafePackageError, "pipe: a FIFO"),
    Case("directory_member", lambda f: f.package(edit_members=_insert(Member("models", typeflag=b"5"))), UnsafePackageError, "models: a directory"),
    Case("duplicate_member", lambda f: f.package(edit_members=lambda ms: [*ms, Member("labels.txt", f.files["labels.txt"])]), UnsafePackageError, "labels.txt: duplicate member"),
    Case("duplicate_manifest", lambda f: f.package(edit_members=lambda ms: [*ms, ms[0]]), UnsafePackageError, "manifest.json: duplicate member"),
    Case("tar_bomb_declared_size", lambda f: f.package(manifest=f.manifest(files=f.files) | {"files": [*f.manifest()["files"], {"path": "bomb.bin", "sha256": "0" * 64, "size": 8 * GIB}]}), UnsafePackageError, "files declare"),
    Case("tar_bomb_header_size", lambda f: f.package(edit_members=_replace_member("labels.txt", Member("labels.txt", f.files["labels.txt"], header_size=8 * GIB - 1))), IntegrityError, "8589934591 bytes in the archive"),
    # --- the manifest (signed, but malformed) ---
    Case("manifest_not_json", lambda f: _manifest_raw(f, b"{'name': 'digits'}"), ManifestError, "invalid JSON"),
    Case("manifest_not_utf8", lambda f: _manifest_raw(f, b'{"name": "\xff"}'), ManifestError, "not UTF-8"),
    Case("manifest_deep_json", lambda f: _manifest_raw(f, b"[" * 100_000 + b"]" * 100_000), ManifestError, "nested 100000 deep"),
    Case("manifest_duplicate_key", lambda f: _manifest_raw(f, b'{"name": "a", "name": "b"}'), ManifestError, "duplicate key 'name'"),
    Case("manifest_nan", lambda f: _manifest_raw(f, b'{"x": NaN}'), ManifestError, "NaN is not allowed"),
    Case("manifest_top_not_object", lambda f: _manifest_raw(f, b"[]"), ManifestError, "expected an object"),
    Case("bad_semver", lambda f: _edit_manifest(f, version="1.0"), ManifestError, "manifest.json: version: '1.0' is not a semantic version"),
    Case("bad_sha256", lambda f: f.package(manifest=f.manifest() | {"files": [{"path": "labels.txt", "sha256": "ab" * 31 + "a", "size": 20}, f.manifest()["files"][1]]}), ManifestError, "manifest.json: files[0].sha256: expected 64 hex chars"),
    Case("negative_size", lambda f: f.package(manifest=f.manifest() | {"files": [{"path": "labels.txt", "sha256": "ab" * 32, "size": -1}]}), ManifestError, "files[0].size: -1 is outside"),
    Case("unknown_format", lambda f: _edit_manifest(f, format=2), ManifestError, "format 2 is not supported"),
    Case("manifest_lists_traversal", lambda f: f.package(manifest=f.manifest() | {"files": [{"path": "../x", "sha256": "ab" * 32, "size": 1}]}), ManifestError, "files[0].path: path with '..'"),
    Case("manifest_lists_itself", lambda f: f.package(manifest=f.manifest() | {"files": [{"path": "manifest.json", "sha256": "ab" * 32, "size": 1}]}), ManifestError, "reserved"),
    Case("model_not_listed", lambda f: _edit_manifest(f, runtime={"kind": "onnx", "precision": "fp32", "model": "other.onnx"}), ManifestError, "runtime.model: 'other.onnx' is not one of the listed files"),
    Case("unknown_key", lambda f: _edit_manifest(f, install_hook="rm -rf /"), ManifestError, "install_hook: unknown key"),
    Case("bad_runtime_kind", lambda f: _edit_manifest(f, runtime={"kind": "pytorch", "precision": "fp32", "model": "model.onnx"}), ManifestError, "runtime.kind: expected one of"),
    # --- file contents ---
    Case("yaml_bomb", lambda f: _with_files(f, {"post.yaml": _yaml_bomb()}), UnsafePackageError, "post.yaml: YAML uses more than 16 aliases"),
    Case("yaml_python_tag", lambda f: _with_files(f, {"post.yaml": b"!!python/object/apply:os.system ['id']\n"}), PackageError, "post.yaml: invalid YAML"),
    Case("pickled_npy", lambda f: _with_files(f, {"golden.npy": npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True)}), UnsafePackageError, "golden.npy: .npy holds pickled Python objects"),
    Case("pickle_file", lambda f: _with_files(f, {"weights.pkl": b"\x80\x04K\x01."}), UnsafePackageError, "weights.pkl: pickle files are refused"),
    Case("onnx_external_data", lambda f: _with_files(f, {"model.onnx": _onnx_external(f)}), UnsafePackageError, "model.onnx: ONNX model uses external data"),
    Case("onnx_garbage", lambda f: _with_files(f, {"model.onnx": b"\x08\x07garbage" * 10}), PackageError, "model.onnx"),
    Case("schema_mismatch", lambda f: _edit_manifest(f, inputs=[{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 9]}]), ManifestError, "inputs[0].shape: [None, 1, 8, 9] declared, the model has [None, 1, 8, 8]"),
    Case("schema_wrong_output_name", lambda f: _edit_manifest(f, outputs=[{"name": "probs", "dtype": "float32", "shape": [None, 10]}]), ManifestError, "outputs[0].name: 'probs' declared"),
    # --- device policy (checked on the verified manifest, before extraction) ---
    Case("downgrade", lambda f: _edit_manifest(f, release_counter=1), DowngradeError, "release_counter 1 is below this device's floor 2"),
    Case("incompatible_hardware", lambda f: _edit_manifest(f, compat={"hardware_classes": ["jetson-orin"]}), CompatibilityError, "built for hardware class jetson-orin, this device is 'rpi4'"),
    Case("agent_too_old", lambda f: _edit_manifest(f, compat={"min_agent_version": "9.0.0"}), CompatibilityError, "needs edge-agent >= 9.0.0, this agent is 0.1.0"),
    Case("runtime_missing", lambda f: _edit_manifest(f, compat={"runtime_features": ["tensorrt"]}), CompatibilityError, "needs runtime feature 'tensorrt'"),
]  # fmt: skip


def test_corpus_is_large_and_ids_unique() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def _device_check(floor: ReleaseFloor) -> Callable[[Manifest], None]:
    def check(manifest: Manifest) -> None:
        check_compat(manifest, "0.1.0", "rpi4", {"onnx", "litert"})
        floor.check(manifest.name, manifest.release_counter)

    return check


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A state dir with an installed package and a floor of 2 for 'digits'."""
    state = tmp_path / "state"
    installed = state / "models" / "digits-1.0.0"
    installed.mkdir(parents=True)
    (installed / "model.onnx").write_bytes(b"installed model")
    (installed / "manifest.json").write_text("{}")
    (state / "current").symlink_to("models/digits-1.0.0")
    (state / "staging").mkdir()
    with ReleaseFloor(state / "state.db") as floor:
        floor.raise_to("digits", 2, "1.0.0")
    return state


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_package_is_refused(case: Case, forge: Forge, device: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg.tar"
    pkg.write_bytes(case.build(forge))
    before = tree_snapshot(device)
    staging = device / "staging" / "digits-new"
    with ReleaseFloor(device / "state.db") as floor, pytest.raises(EdgeAgentError) as info:
        read_package(
            pkg,
            forge.keyring,
            staging,
            limits=case.limits,
            check_manifest=_device_check(floor),
        )
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    assert case.fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert not staging.exists()
    # state.db may checkpoint its WAL; everything else must be byte-for-byte the same.
    after = tree_snapshot(device)
    for snap in (before, after):
        for key in [k for k in snap if k.startswith("state.db")]:
            del snap[key]
    assert after == before
    # Nothing escaped next to the package or in /tmp either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg.tar", "state"]
    assert not Path("/tmp/evil.txt").exists()


def test_the_unmodified_forge_package_is_accepted(
    forge: Forge, device: Path, tmp_path: Path
) -> None:
    """The control case: without the attack, the same forge output is read fine."""
    pkg = tmp_path / "pkg.tar"
    pkg.write_bytes(forge.package())
    with ReleaseFloor(device / "state.db") as floor:
        verified = read_package(
            pkg, forge.keyring, device / "staging" / "new", check_manifest=_device_check(floor)
        )
    assert (verified.root / "labels.txt").read_bytes() == forge.files["labels.txt"]
    assert verified.model_path is not None
    assert verified.model_path.read_bytes() == forge.files["model.onnx"]
    assert set(verified.signatures.valid_keyids) == {forge.keys["r1"].keyid, forge.keys["r2"].keyid}


STREAM_CASES = [c for c in CASES if c.error not in (DowngradeError, CompatibilityError)]


@pytest.mark.parametrize("case", STREAM_CASES[:20], ids=[c.id for c in STREAM_CASES[:20]])
def test_verify_package_refuses_the_same_way(case: Case, forge: Forge, tmp_path: Path) -> None:
    """verify_package (no extraction) gives the same error for the archive-level cases."""
    pkg = tmp_path / "pkg.tar"
    pkg.write_bytes(case.build(forge))
    with pytest.raises(EdgeAgentError) as info:
        verify_package(pkg, forge.keyring, limits=case.limits)
    assert type(info.value) is case.error
    assert case.fragment in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg.tar"]


def test_staging_dir_that_is_a_symlink_is_refused(forge: Forge, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg.tar"
    pkg.write_bytes(forge.package())
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "staging").symlink_to(target)
    with pytest.raises(EdgeAgentError, match="symlink"):
        read_package(pkg, forge.keyring, tmp_path / "staging")
    assert list(target.iterdir()) == []


def test_existing_nonempty_staging_is_refused_and_kept(forge: Forge, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg.tar"
    pkg.write_bytes(forge.package())
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "keep.txt").write_text("mine")
    with pytest.raises(EdgeAgentError, match="new or empty"):
        read_package(pkg, forge.keyring, staging)
    assert (staging / "keep.txt").read_text() == "mine"


def test_tar_header_roundtrip_sanity() -> None:
    header = tar_header("a/b.txt", 5)
    assert len(header) == 512 and header[257:263] == b"ustar\x00"
