"""The device-side safe reader: signatures first, then listed regular files streamed by name."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import yaml

from agent.errors import (
    BackendUnavailableError,
    EdgeAgentError,
    IntegrityError,
    ManifestError,
    ModelError,
    PackageError,
    StateError,
    UnsafePackageError,
    UsageError,
)
from agent.package.keys import Keyring, SignatureCheck, require_threshold
from agent.package.manifest import (
    MANIFEST_NAME,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    RESERVED_NAMES,
    SIGNATURES_NAME,
    FileEntry,
    Manifest,
    check_relative_path,
    parse_manifest,
)
from agent.package.tarstream import Member, TarReader
from agent.progress import Progress, ProgressReader
from agent.runtime.base import TensorSpec
from agent.textio import open_regular

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
BACKEND_FOR_KIND = {"onnx": "onnx", "tflite": "litert", "tensorrt": "tensorrt"}


@dataclass(frozen=True)
class ReadLimits:
    """Caps that bound what a hostile package can make the reader do."""

    max_package_bytes: int = 4 << 30
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    max_signatures_bytes: int = 64 << 10
    max_yaml_bytes: int = 1 << 20
    max_yaml_aliases: int = 16
    max_yaml_depth: int = 64


@dataclass(frozen=True)
class VerifiedPackage:
    """A package whose signatures, files and hashes passed, extracted under ``root``."""

    manifest: Manifest
    root: Path
    manifest_bytes: bytes
    signatures: SignatureCheck

    @property
    def model_path(self) -> Path | None:
        if self.manifest.runtime is None:
            return None
        return self.root / self.manifest.runtime.model


ManifestHook = Callable[[Manifest], None]
Source = Path | str | BinaryIO


@contextmanager
def _open_source(source: Source, limits: ReadLimits) -> Iterator[tuple[BinaryIO, int | None]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        # A FIFO, device or directory is refused before it is opened: a FIFO would block
        # the open forever (and the OTA lock with it). Unbuffered: readinto() then fills
        # our chunk buffer with no extra copy.
        fh = open_regular(path, "package file", UsageError, buffering=0)
        try:
            st = os.fstat(fh.fileno())
            if st.st_size > limits.max_package_bytes:
                raise UnsafePackageError(
                    f"{path}: package is {st.st_size} bytes, more than the "
                    f"{limits.max_package_bytes} allowed"
                )
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            with Progress(f"verify {path.name}", st.st_size) as bar:
                yield (cast(BinaryIO, ProgressReader(fh, bar)) if bar.active else fh), st.st_size
        finally:
            fh.close()
    else:
        yield source, None


def _read_small_member(reader: TarReader, want: str, position: str, max_bytes: int) -> bytes:
    member = reader.next()
    if member is None:
        raise PackageError(f"not a package: the archive has no {want} ({position} member)")
    if member.name != want:
        raise UnsafePackageError(f"the {position} member must be {want}, found {member.name!r}")
    if not member.is_regular:
        raise UnsafePackageError(f"{want}: a {member.kind}, not a regular file")
    if member.size > max_bytes:
        raise UnsafePackageError(f"{want}: {member.size} bytes, more than the {max_bytes} allowed")
    return reader.read_data(member)


def _read_head(
    reader: TarReader, keyring: Keyring, role: str, limits: ReadLimits
) -> tuple[bytes, bytes, SignatureCheck, Manifest]:
    manifest_raw = _read_small_member(reader, MANIFEST_NAME, "first", limits.max_manifest_bytes)
    sig_raw = _read_small_member(reader, SIGNATURES_NAME, "second", limits.max_signatures_bytes)
    # Trust first: nothing in the manifest is looked at until the threshold is met.
    check = require_threshold(manifest_raw, sig_raw, keyring, role)
    manifest = parse_manifest(manifest_raw, MANIFEST_NAME, limits.max_manifest_bytes)
    if manifest.total_bytes > limits.max_package_bytes:
        raise UnsafePackageError(
            f"{MANIFEST_NAME}: files declare {manifest.total_bytes} bytes, more than the "
            f"{limits.max_package_bytes} allowed"
        )
    return manifest_raw, sig_raw, check, manifest


SinkFactory = Callable[[FileEntry], tuple[Callable[[memoryview], Any], Callable[[], None]]]


def _stream_members(
    reader: TarReader, manifest: Manifest, total_bytes: int | None, open_sink: SinkFactory | None
) -> None:
    expected = {f.path: f for f in manifest.files}
    seen: set[str] = set()
    count = 0
    while (member := reader.next()) is not None:
        count += 1
        if count > MAX_FILES:
            raise UnsafePackageError(f"more than {MAX_FILES} members in the package")
        entry = _admit_member(member, expected, seen)
        seen.add(member.name)
        if open_sink is None:
            actual = _hash_member(reader, member, None)
        else:
            write, close = open_sink(entry)
            try:
                actual = _hash_member(reader, member, write)
            finally:
                close()
        if actual != entry.sha256:
            raise IntegrityError(
                f"{entry.path}: sha256 mismatch (manifest.json says {entry.sha256[:16]}..., "
                f"the file has {actual[:16]}...)"
            )
    missing = [p for p in expected if p not in seen]
    if missing:
        raise IntegrityError(f"{missing[0]}: listed in manifest.json but missing from the package")
    reader.check_trailer(total_bytes)


def _hash_member(
    reader: TarReader, member: Member, write: Callable[[memoryview], Any] | None
) -> str:
    digest = hashlib.sha256()
    if write is None:
        reader.stream_data(member, digest.update)
    else:

        def both(chunk: memoryview) -> None:
            digest.update(chunk)
            write(chunk)

        reader.stream_data(member, both)
    return digest.hexdigest()


def _admit_member(member: Member, expected: dict[str, FileEntry], seen: set[str]) -> FileEntry:
    name = member.name
    if not member.is_regular:
        raise UnsafePackageError(f"{name}: a {member.kind} in the package is refused")
    problem = check_relative_path(name)
    if problem:
        raise UnsafePackageError(f"tar member {name!r}: {problem}")
    if name in RESERVED_NAMES or name in seen:
        raise UnsafePackageError(f"{name}: duplicate member in the package")
    entry = expected.get(name)
    if entry is None:
        raise UnsafePackageError(f"{name}: not listed in manifest.json")
    if member.size != entry.size:
        raise IntegrityError(
            f"{name}: {member.size} bytes in the archive, manifest.json says {entry.size}"
        )
    return entry


def verify_package(
    source: Source,
    keyring: Keyring,
    *,
    role: str = "release",
    limits: ReadLimits | None = None,
    check_manifest: ManifestHook | None = None,
) -> Manifest:
    """Check signatures, listed files, sizes and hashes in one streaming pass; write nothing.

    ``check_manifest`` (compat, anti-downgrade) runs on the verified manifest before any
    file data is read.
    """
    limits = limits or ReadLimits()
    with _open_source(source, limits) as (fh, total):
        reader = TarReader(fh, limits.max_package_bytes)
        _, _, _, manifest = _read_head(reader, keyring, role, limits)
        if check_manifest is not None:
            check_manifest(manifest)
        _stream_members(reader, manifest, total, None)
    return manifest


def read_package(
    source: Source,
    keyring: Keyring,
    staging_dir: Path,
    *,
    role: str = "release",
    limits: ReadLimits | None = None,
    check_manifest: ManifestHook | None = None,
    check_model: bool = True,
    fsync: bool = True,
) -> VerifiedPackage:
    """Verify a package and extract its listed files into ``staging_dir`` (new or empty).

    On any failure ``staging_dir`` is removed (or emptied, if it existed) and the error is
    raised; nothing is written anywhere else. On success the directory holds the exact
    manifest.json and manifest.sig.json beside the files, ready to be renamed into place.
    """
    limits = limits or ReadLimits()
    staging_dir = Path(staging_dir)
    created = _prepare_staging(staging_dir)
    root_fd = os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with _open_source(source, limits) as (fh, total):
            reader = TarReader(fh, limits.max_package_bytes)
            manifest_raw, sig_raw, check, manifest = _read_head(reader, keyring, role, limits)
            if check_manifest is not None:
                check_manifest(manifest)
            _stream_members(reader, manifest, total, _file_sink_factory(root_fd, fsync))
        check_contents(manifest, staging_dir, limits, check_model=check_model)
        for name, data in ((MANIFEST_NAME, manifest_raw), (SIGNATURES_NAME, sig_raw)):
            write, close = _create_file(root_fd, name, fsync)
            try:
                write(memoryview(data))
            finally:
                close()
        if fsync:
            _fsync_tree(staging_dir)
    except BaseException:
        os.close(root_fd)
        _discard_staging(staging_dir, created)
        raise
    os.close(root_fd)
    return VerifiedPackage(manifest, staging_dir, manifest_raw, check)


def _prepare_staging(staging_dir: Path) -> bool:
    if staging_dir.is_symlink():
        raise StateError(f"{staging_dir}: staging directory is a symlink")
    try:
        staging_dir.parent.mkdir(parents=True, exist_ok=True)
        staging_dir.mkdir(mode=0o755)
        return True
    except FileExistsError:
        if not staging_dir.is_dir() or any(staging_dir.iterdir()):
            raise StateError(f"{staging_dir}: staging directory must be new or empty") from None
        return False
    except OSError as exc:
        raise StateError(
            f"{staging_dir}: cannot create staging directory ({exc.strerror})"
        ) from None


def _discard_staging(staging_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(staging_dir, ignore_errors=True)
        return
    for child in staging_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _create_file(
    root_fd: int, relpath: str, fsync: bool
) -> tuple[Callable[[memoryview], Any], Callable[[], None]]:
    """Open ``relpath`` for writing under the staging fd, walking components with O_NOFOLLOW."""
    parts = relpath.split("/")
    dir_fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            with suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=dir_fd)
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = os.open(
            parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd
        )
    except OSError as exc:
        raise StateError(f"{relpath}: cannot create in staging ({exc.strerror})") from None
    finally:
        os.close(dir_fd)
    fh = io.FileIO(fd, "wb", closefd=True)

    def write(chunk: memoryview) -> None:
        try:
            while chunk:
                n = fh.write(chunk)
                chunk = chunk[n or 0 :]
        except OSError as exc:
            raise StateError(f"{relpath}: cannot write to staging ({exc.strerror})") from None

    def close() -> None:
        try:
            if fsync:
                os.fsync(fh.fileno())
        finally:
            fh.close()

    return write, close


def _file_sink_factory(root_fd: int, fsync: bool) -> SinkFactory:
    def open_sink(entry: FileEntry) -> tuple[Callable[[memoryview], Any], Callable[[], None]]:
        return _create_file(root_fd, entry.path, fsync)

    return open_sink


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root):
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------
# Content checks on extracted (hash-verified) files
# ---------------------------------------------------------------------------------------


def check_contents(
    manifest: Manifest, root: Path, limits: ReadLimits | None = None, check_model: bool = True
) -> None:
    """Refuse dangerous content in listed files: YAML bombs, pickles, ONNX external data."""
    limits = limits or ReadLimits()
    for entry in manifest.files:
        path = root / entry.path
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise UnsafePackageError(f"{entry.path}: pickle files are refused")
        if suffix in (".yaml", ".yml"):
            check_yaml_file(path, entry.path, limits)
        elif suffix == ".npy":
            check_npy_file(path, entry.path)
        elif suffix == ".onnx":
            check_onnx_file(path, entry.path)
    if check_model and manifest.runtime is not None:
        check_model_schema(manifest, root / manifest.runtime.model)


def check_yaml_file(path: Path, rel: str, limits: ReadLimits) -> Any:
    """safe_load with a size cap, and refuse alias-heavy or deeply nested YAML (bombs)."""
    size = path.stat().st_size
    if size > limits.max_yaml_bytes:
        raise UnsafePackageError(f"{rel}: YAML is {size} bytes, more than {limits.max_yaml_bytes}")
    try:
        text = path.read_text(encoding="utf-8")
        aliases = depth = deepest = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > limits.max_yaml_aliases:
                    raise UnsafePackageError(
                        f"{rel}: YAML uses more than {limits.max_yaml_aliases} aliases "
                        "(a YAML bomb?), refused"
                    )
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                deepest = max(deepest, depth)
                if deepest > limits.max_yaml_depth:
                    raise UnsafePackageError(
                        f"{rel}: YAML nested deeper than {limits.max_yaml_depth}, refused"
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except UnicodeDecodeError:
        raise PackageError(f"{rel}: YAML is not UTF-8") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PackageError(f"{rel}: invalid YAML ({problem})") from None


def check_npy_file(path: Path, rel: str) -> None:
    """Open the .npy header without pickles (mmap: the data itself is not read)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        text = str(exc).lower()
        if "pickle" in text or "object" in text:
            raise UnsafePackageError(f"{rel}: .npy holds pickled Python objects, refused") from None
        raise PackageError(f"{rel}: not a plain .npy array ({str(exc)[:80]})") from None
    except (OSError, EOFError) as exc:
        raise PackageError(f"{rel}: cannot read .npy ({str(exc)[:80]})") from None
    if not isinstance(arr, np.ndarray):
        raise PackageError(f"{rel}: expected one .npy array")
    del arr


def onnx_external_data(path: Path) -> str | None:
    """The name of a tensor that points at external data, or None when there is none.

    Read from the protobuf wire format (agent.runtime.onnx_wire): the same check with or
    without the `onnx` package, which devices do not install.
    """
    from agent.runtime.onnx_wire import external_data_tensor

    return external_data_tensor(path)


def check_onnx_file(path: Path, rel: str) -> None:
    try:
        found = onnx_external_data(path)
    except ModelError as exc:
        raise PackageError(f"{rel}: {exc}") from None
    if found:
        raise UnsafePackageError(f"{rel}: ONNX model uses external data ({found}), refused")


def compare_schema(
    declared: tuple[TensorSpec, ...], actual: tuple[TensorSpec, ...], what: str
) -> str | None:
    """Why a declared input/output schema does not match the model's, or None."""
    if len(declared) != len(actual):
        return f"{what}: {len(declared)} declared, the model has {len(actual)}"
    for i, (d, a) in enumerate(zip(declared, actual)):
        where = f"{what}[{i}]"
        if d.name != a.name:
            return f"{where}.name: {d.name!r} declared, the model has {a.name!r}"
        if d.dtype != a.dtype:
            return f"{where}.dtype: {d.dtype} declared, the model has {a.dtype}"
        if tuple(d.shape) != tuple(a.shape):
            return f"{where}.shape: {list(d.shape)} declared, the model has {list(a.shape)}"
        dq, aq = d.quantization, a.quantization
        if (dq is None) != (aq is None) or (
            dq is not None
            and aq is not None
            and (
                abs(dq.scale - aq.scale) > 1e-6 * max(1.0, abs(aq.scale))
                or dq.zero_point != aq.zero_point
            )
        ):
            return f"{where}.quantization: {dq} declared, the model has {aq}"
    return None


def check_model_schema(manifest: Manifest, model_path: Path) -> None:
    """Load the model with its runtime and refuse a manifest whose I/O schema differs."""
    from agent.runtime import load_backend

    assert manifest.runtime is not None
    backend_name = BACKEND_FOR_KIND[manifest.runtime.kind]
    try:
        backend = load_backend(model_path, backend_name)
    except BackendUnavailableError as exc:
        log.warning("model schema of %s not checked here: %s", manifest.package_id, exc)
        return
    except EdgeAgentError as exc:
        raise PackageError(f"{manifest.runtime.model}: the model does not load ({exc})") from None
    try:
        for declared, actual, what in (
            (manifest.inputs, backend.inputs, "inputs"),
            (manifest.outputs, backend.outputs, "outputs"),
        ):
            problem = compare_schema(declared, actual, what)
            if problem:
                raise ManifestError(f"{MANIFEST_NAME}: {problem}")
    finally:
        backend.close()


def load_installed(
    directory: Path, keyring: Keyring | None = None, check_files: bool = False
) -> Manifest:
    """The manifest of an installed package directory; optionally re-check signatures/hashes."""
    try:
        raw = (directory / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        raise PackageError(f"{directory}: cannot read {MANIFEST_NAME} ({exc.strerror})") from None
    if keyring is not None:
        try:
            sig_raw = (directory / SIGNATURES_NAME).read_bytes()
        except OSError as exc:
            raise PackageError(
                f"{directory}: cannot read {SIGNATURES_NAME} ({exc.strerror})"
            ) from None
        require_threshold(raw, sig_raw, keyring)
    manifest = parse_manifest(raw, f"{directory / MANIFEST_NAME}")
    if check_files:
        for entry in manifest.files:
            path = directory / entry.path
            try:
                if path.is_symlink() or not path.is_file():
                    raise IntegrityError(f"{path}: missing or not a regular file")
                digest = hashlib.sha256()
                with path.open("rb") as fh:
                    while chunk := fh.read(1 << 20):
                        digest.update(chunk)
            except OSError as exc:
                raise IntegrityError(f"{path}: cannot read ({exc.strerror})") from None
            if path.stat().st_size != entry.size or digest.hexdigest() != entry.sha256:
                raise IntegrityError(f"{path}: size or sha256 differs from {MANIFEST_NAME}")
    return manifest
