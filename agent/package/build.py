"""Operator side: build a package from a model, schema and labels; add signatures; inspect."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import load_yaml_file
from agent.errors import ConfigError, ManifestError, ModelError, UsageError
from agent.package.keys import (
    KEYRING_NAME,
    Keyring,
    SignatureCheck,
    SigningKey,
    check_signatures,
    parse_signatures,
    signatures_bytes,
)
from agent.package.manifest import (
    MANIFEST_NAME,
    SIGNATURES_NAME,
    Manifest,
    check_relative_path,
    manifest_bytes,
    parse_manifest,
)
from agent.package.reader import BACKEND_FOR_KIND, ReadLimits, _read_small_member, compare_schema
from agent.package.tarstream import CHUNK_BYTES, END_OF_ARCHIVE, TarReader, padding, tar_header
from agent.progress import Progress, ProgressReader
from agent.runtime.base import TensorSpec
from agent.textio import atomic_file, open_regular, read_regular

KIND_FOR_SUFFIX = {".onnx": "onnx", ".tflite": "tflite", ".engine": "tensorrt", ".plan": "tensorrt"}
# Labels are one line each; even 21k ImageNet classes take about 300 kB.
MAX_LABELS_BYTES = 16 << 20
SCHEMA_KEYS = (
    "name",
    "version",
    "release_counter",
    "task",
    "runtime",
    "inputs",
    "outputs",
    "preprocess",
    "labels",
    "compat",
    "gate",
    "detection",
    "shadow",
)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, streamed."""
    digest = hashlib.sha256()
    size = 0
    try:
        with (
            open_regular(path) as fh,
            Progress(f"hash {path.name}", os.fstat(fh.fileno()).st_size) as bar,
        ):
            while chunk := fh.read(CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
                bar.advance(len(chunk))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    return digest.hexdigest(), size


def utc_now() -> str:
    # SOURCE_DATE_EPOCH makes rebuilt packages byte-identical (reproducible builds).
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    ts = float(epoch) if epoch and epoch.isdigit() else time.time()
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_package(
    out_path: Path, manifest_raw: bytes, sig_raw: bytes, files: Sequence[tuple[str, Path]]
) -> Path:
    """Write the tar atomically: manifest.json, manifest.sig.json, then ``files`` in order."""
    try:
        with atomic_file(out_path) as out:
            for name, data in ((MANIFEST_NAME, manifest_raw), (SIGNATURES_NAME, sig_raw)):
                out.write(tar_header(name, len(data)) + data + padding(len(data)))
            for name, src in files:
                with open_regular(src) as fh:
                    size = os.fstat(fh.fileno()).st_size
                    out.write(tar_header(name, size))
                    with Progress(f"write {name}", size) as bar:
                        shutil.copyfileobj(
                            ProgressReader(fh, bar) if bar.active else fh, out, CHUNK_BYTES
                        )
                out.write(padding(size))
            out.write(END_OF_ARCHIVE)
    except OSError as exc:
        raise UsageError(f"{out_path}: cannot write package ({exc.strerror})") from None
    return out_path


def package_from_files(
    out: Path, data: Mapping[str, Any], files: Mapping[str, Path]
) -> tuple[Path, Manifest]:
    """Hash ``files`` (package path -> source), complete the manifest and write the tar."""
    entries = []
    for name, src in sorted(files.items()):
        problem = check_relative_path(name)
        if problem:
            raise UsageError(f"{name}: {problem}")
        sha, size = file_digest(src)
        entries.append({"path": name, "sha256": sha, "size": size})
    doc = dict(data)
    doc["files"] = entries
    try:
        raw = manifest_bytes(doc)
    except ManifestError as exc:
        raise UsageError(f"schema: {str(exc).split(': ', 1)[1]}") from None
    manifest = parse_manifest(raw)
    path = out if out.suffix == ".tar" else out / f"{manifest.package_id}.tar"
    write_package(path, raw, signatures_bytes([]), sorted(files.items()))
    return path, manifest


def read_labels(path: Path) -> list[str]:
    try:
        text = read_regular(path, MAX_LABELS_BYTES, "labels file").decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read labels ({exc})") from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    return labels


def _tensors_to_data(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    out = []
    for t in specs:
        q = None
        if t.quantization is not None:
            q = {"scale": t.quantization.scale, "zero_point": t.quantization.zero_point}
        out.append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "quantization": q})
    return out


def build_package(
    model: Path,
    schema: Path,
    out: Path,
    labels: Path | None = None,
    *,
    name: str | None = None,
    version: str | None = None,
    release_counter: int | None = None,
    extra_files: Mapping[str, Path] | None = None,
    check_model: bool = True,
) -> tuple[Path, Manifest]:
    """Build an unsigned package; the model's real inputs/outputs must match the schema.

    ``out`` is a directory (the tar is named ``<name>-<version>.tar``) or a file path.
    """
    if not model.is_file():
        raise UsageError(f"{model}: model file not found")
    doc, kind, model_name = _schema_doc(schema, model, name, version, release_counter)
    if check_model:
        _check_model_against(doc, model, schema, kind, model_name)
    files: dict[str, Path] = {model_name: model}
    if labels is not None:
        label_list = read_labels(labels)
        if "labels" in doc and list(doc["labels"]) != label_list:
            raise ConfigError(f"{schema}:labels: differ from {labels}; give them in one place")
        doc["labels"] = label_list
        files["labels.txt"] = labels
    for pkg_name, src in (extra_files or {}).items():
        if pkg_name in files:
            raise UsageError(f"{pkg_name}: given twice")
        files[pkg_name] = src
    data: dict[str, Any] = {
        "format": 1,
        "name": doc["name"],
        "version": doc["version"],
        "release_counter": doc["release_counter"],
        "created": utc_now(),
    }
    for key in SCHEMA_KEYS:
        if key in doc and key not in data:
            data[key] = doc[key]
    return package_from_files(out, data, files)


def _schema_doc(
    schema: Path,
    model: Path,
    name: str | None,
    version: str | None,
    release_counter: int | None,
) -> tuple[dict[str, Any], str, str]:
    """The schema YAML with the flags and defaults applied; also the runtime kind and the
    model's name inside the package."""
    doc = load_yaml_file(schema)
    if not isinstance(doc, dict):
        raise ConfigError(f"{schema}: expected a mapping at the top level")
    for key in doc:
        if key not in SCHEMA_KEYS:
            raise ConfigError(f"{schema}:{key}: unknown key (known keys: {', '.join(SCHEMA_KEYS)})")
    for key, value in (("name", name), ("version", version), ("release_counter", release_counter)):
        if value is not None:
            doc[key] = value
        if key not in doc:
            raise ConfigError(f"{schema}:{key}: missing (or give --{key.replace('_', '-')})")
    runtime = dict(doc.get("runtime") or {})
    kind = runtime.get("kind") or KIND_FOR_SUFFIX.get(model.suffix.lower())
    if kind is None:
        raise UsageError(f"{model}: cannot tell the runtime; set runtime.kind in {schema}")
    model_name = "model" + model.suffix.lower()
    runtime.update(
        {"kind": kind, "precision": runtime.get("precision", "fp32"), "model": model_name}
    )
    doc["runtime"] = runtime
    doc.setdefault("task", "classification")
    compat = dict(doc.get("compat") or {})
    compat.setdefault("min_agent_version", __version__)
    compat.setdefault("hardware_classes", [])
    compat.setdefault("runtime_features", [kind])
    doc["compat"] = compat
    return doc, kind, model_name


def _check_model_against(
    doc: dict[str, Any], model: Path, schema: Path, kind: str, model_name: str
) -> None:
    """Load the model: fill inputs/outputs the schema leaves out, refuse ones that differ."""
    from agent.runtime import load_backend

    backend = load_backend(model, BACKEND_FOR_KIND.get(kind, "auto"))
    try:
        for key, actual in (("inputs", backend.inputs), ("outputs", backend.outputs)):
            if key not in doc:
                doc[key] = _tensors_to_data(actual)
                continue
            declared = parse_manifest(manifest_bytes(_probe_doc(doc, model_name)), str(schema))
            problem = compare_schema(getattr(declared, key), actual, key)
            if problem:
                raise ModelError(f"{schema}: {problem}")
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        backend.close()


def _probe_doc(doc: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """A throwaway manifest document used only to validate the schema's tensor entries."""
    probe = {k: v for k, v in doc.items() if k in SCHEMA_KEYS}
    probe.update(
        {
            "format": 1,
            "created": "2000-01-01T00:00:00Z",
            "files": [{"path": model_name, "sha256": "0" * 64, "size": 0}],
        }
    )
    probe.setdefault("inputs", [{"name": "x", "dtype": "float32", "shape": [1]}])
    probe.setdefault("outputs", [{"name": "y", "dtype": "float32", "shape": [1]}])
    probe.pop("labels", None)
    return probe


# ---------------------------------------------------------------------------------------
# Reading the head of a package without trusting it (operator tools)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageHead:
    """The first two members of a package, read but not trusted."""

    manifest_raw: bytes
    sig_raw: bytes
    manifest: Manifest
    signatures: list[dict[str, str]]
    rest_offset: int


def read_head(pkg: Path, limits: ReadLimits | None = None) -> PackageHead:
    """Read manifest.json and manifest.sig.json (no signature check: for sign and inspect)."""
    limits = limits or ReadLimits()
    with open_regular(pkg, "package file") as fh:
        reader = TarReader(fh, limits.max_package_bytes)
        m_raw = _read_small_member(reader, MANIFEST_NAME, "first", limits.max_manifest_bytes)
        s_raw = _read_small_member(reader, SIGNATURES_NAME, "second", limits.max_signatures_bytes)
        manifest = parse_manifest(m_raw)
        sigs = parse_signatures(s_raw)
        return PackageHead(m_raw, s_raw, manifest, sigs, reader.pos)


def check_head(head: PackageHead, keyring: Keyring, role: str = "release") -> SignatureCheck:
    return check_signatures(head.manifest_raw, head.signatures, keyring, role)


def sign_package(pkg: Path, key: SigningKey) -> tuple[bool, int]:
    """Add ``key``'s signature to the package in place; (added, number of signatures)."""
    head = read_head(pkg)
    if any(s["keyid"] == key.keyid for s in head.signatures):
        return False, len(head.signatures)
    sigs = [*head.signatures, key.sign(head.manifest_raw)]
    sig_raw = signatures_bytes(sigs)
    try:
        with open_regular(pkg, "package file") as src, atomic_file(pkg) as out:
            for name, data in ((MANIFEST_NAME, head.manifest_raw), (SIGNATURES_NAME, sig_raw)):
                out.write(tar_header(name, len(data)) + data + padding(len(data)))
            # The file members are copied byte for byte; their hashes are in the manifest.
            src.seek(head.rest_offset)
            shutil.copyfileobj(src, out, CHUNK_BYTES)
    except OSError as exc:
        raise UsageError(f"{pkg}: cannot rewrite package ({exc.strerror})") from None
    return True, len(sigs)


def build_keyring_package(
    keyring_dir: Path, out: Path, version: str, release_counter: int, name: str = "keyring"
) -> tuple[Path, Manifest]:
    """A package (task "keyring") carrying a new keyring; sign it with the current keys."""
    keyring = Keyring.load(keyring_dir)
    files: dict[str, Path] = {KEYRING_NAME: keyring_dir / KEYRING_NAME}
    for pub in sorted(keyring_dir.glob("*.pub.json")):
        files[pub.name] = pub
    data = {
        "format": 1,
        "name": name,
        "version": version,
        "release_counter": release_counter,
        "created": utc_now(),
        "task": "keyring",
        "compat": {"min_agent_version": "0.1.0", "hardware_classes": [], "runtime_features": []},
        "x-keyring-version": keyring.version,
    }
    return package_from_files(out, data, files)
