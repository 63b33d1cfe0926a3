"""CLI commands: keys (generate, keyring, rotation) and package (build, sign, verify, inspect)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import tempfile
from pathlib import Path

from agent import __version__
from agent.commands import SubParsers, add_command
from agent.errors import EXIT_OK, UsageError
from agent.package.build import (
    build_keyring_package,
    build_package,
    check_head,
    read_head,
    sign_package,
)
from agent.package.compat import check_compat
from agent.package.keyring_update import apply_keyring_update
from agent.package.keys import (
    ROLES,
    Keyring,
    build_keyring,
    generate_key,
    key_is_encrypted,
    load_public_key_file,
    load_signing_key,
    write_keyring,
)
from agent.package.reader import read_package
from agent.package.revert import sign_revert_file
from agent.textio import format_table


def _passphrase_from_env(var: str | None) -> bytes | None:
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise UsageError(f"--passphrase-env {var}: the environment variable is not set")
    if not value:
        raise UsageError(f"--passphrase-env {var}: the environment variable is empty")
    return value.encode()


def _new_passphrase(args: argparse.Namespace) -> bytes | None:
    if args.passphrase_env:
        return _passphrase_from_env(args.passphrase_env)
    if not args.prompt_passphrase:
        return None
    first = getpass.getpass("Passphrase for the new key: ")
    if not first:
        raise UsageError("empty passphrase")
    if getpass.getpass("Repeat the passphrase: ") != first:
        raise UsageError("the two passphrases differ")
    return first.encode()


def _signing_passphrase(key_path: Path, env_var: str | None) -> bytes | None:
    if env_var:
        return _passphrase_from_env(env_var)
    if key_is_encrypted(key_path) and sys.stdin.isatty():
        return getpass.getpass(f"Passphrase for {key_path}: ").encode()
    return None


# --- keys ---------------------------------------------------------------------------


def cmd_keys_generate(args: argparse.Namespace) -> int:
    key_path, pub_path, keyid = generate_key(
        args.role, Path(args.out), args.name, _new_passphrase(args)
    )
    print(f"{args.role} key {keyid}")
    print(f"  private: {key_path} (mode 0600)")
    print(f"  public:  {pub_path}")
    return EXIT_OK


def cmd_keys_keyring(args: argparse.Namespace) -> int:
    keys = [load_public_key_file(Path(p)) for p in args.public_keys]
    thresholds = {"release": args.threshold}
    if any(k.role == "rollout" for k in keys):
        thresholds["rollout"] = args.rollout_threshold
    if not any(k.role == "release" for k in keys):
        raise UsageError("a keyring needs at least one release public key")
    keyring = build_keyring(keys, thresholds, args.revoke, args.keyring_version)
    path = write_keyring(keyring, Path(args.out))
    for role, spec in keyring.roles.items():
        print(f"{role}: {spec.threshold} of {len(spec.keyids)} key(s)")
    print(f"wrote {path}")
    return EXIT_OK


def cmd_keys_update_package(args: argparse.Namespace) -> int:
    path, manifest = build_keyring_package(
        Path(args.keyring), Path(args.out), args.version, args.release_counter
    )
    print(f"built {path} ({manifest.package_id}, unsigned: sign it with the current release keys)")
    return EXIT_OK


def cmd_keys_apply_update(args: argparse.Namespace) -> int:
    keyring = apply_keyring_update(Path(args.package), Path(args.keyring))
    release = keyring.roles["release"]
    print(
        f"keyring {args.keyring} is now version {keyring.version}: release "
        f"{release.threshold} of {len(release.keyids)}, {len(keyring.revoked)} revoked"
    )
    return EXIT_OK


# --- package ------------------------------------------------------------------------


def _parse_extra_files(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, src = item.partition("=")
        if not sep or not name or not src:
            raise UsageError(f"--file {item!r}: expected NAME=PATH")
        out[name] = Path(src)
    return out


def cmd_package_build(args: argparse.Namespace) -> int:
    path, manifest = build_package(
        Path(args.model),
        Path(args.schema),
        Path(args.out),
        Path(args.labels) if args.labels else None,
        name=args.name,
        version=args.version,
        release_counter=args.release_counter,
        extra_files=_parse_extra_files(args.file),
        check_model=not args.no_check_model,
    )
    print(
        f"built {path}: {manifest.package_id} release_counter {manifest.release_counter}, "
        f"{len(manifest.files)} file(s), {manifest.total_bytes} bytes, unsigned"
    )
    return EXIT_OK


def cmd_package_sign(args: argparse.Namespace) -> int:
    key_path = Path(args.key)
    key = load_signing_key(key_path, _signing_passphrase(key_path, args.passphrase_env))
    added, count = sign_package(Path(args.package), key)
    state = "signed" if added else "already signed"
    print(f"{state} {args.package} with key {key.keyid[:16]} ({count} signature(s))")
    return EXIT_OK


def cmd_package_sign_revert(args: argparse.Namespace) -> int:
    from agent.package.revert import REVERT_SUFFIX, revert_target

    key_path = Path(args.key)
    key = load_signing_key(key_path, _signing_passphrase(key_path, args.passphrase_env))
    out = Path(args.out)
    if out.is_dir() or not out.name.endswith(REVERT_SUFFIX):
        if args.package is None or args.version is None:
            raise UsageError(
                f"{out}: give a *{REVERT_SUFFIX} file, or --package and --version to name one"
            )
        out = out / revert_target(args.package, args.version).rpartition("/")[2]
    auth, count = sign_revert_file(
        out, key, args.package, args.version, args.release_counter, args.max_floor
    )
    print(
        f"signed revert to {auth.package} {auth.version} (release_counter "
        f"{auth.release_counter}, floors up to {auth.max_floor}) with key {key.keyid[:16]} "
        f"({count} signature(s)): {out}"
    )
    return EXIT_OK


def cmd_package_verify(args: argparse.Namespace) -> int:
    keyring = Keyring.load(Path(args.keyring))

    def compat(manifest: object) -> None:
        from agent.package.manifest import Manifest
        from agent.runtime import installed_runtimes

        assert isinstance(manifest, Manifest)
        if args.hardware_class is not None or args.agent_version is not None:
            check_compat(
                manifest,
                args.agent_version or __version__,
                args.hardware_class or "generic",
                installed_runtimes(),
            )

    # Exactly what a device does: full read into a throwaway staging directory.
    with tempfile.TemporaryDirectory(prefix="edge-agent-verify-") as tmp:
        pkg = read_package(
            Path(args.package),
            keyring,
            Path(tmp) / "pkg",
            role=args.role,
            check_manifest=compat,
            fsync=False,
        )
    m = pkg.manifest
    print(
        f"OK {m.package_id} (release_counter {m.release_counter}): "
        f"{pkg.signatures.summary()}, {len(m.files)} file(s), {m.total_bytes} bytes"
    )
    return EXIT_OK


def cmd_package_inspect(args: argparse.Namespace) -> int:
    head = read_head(Path(args.package))
    m = head.manifest
    check = check_head(head, Keyring.load(Path(args.keyring))) if args.keyring else None
    if args.json:
        out = {
            "manifest": m.to_dict(),
            "signatures": [s["keyid"] for s in head.signatures],
            "verified": None if check is None else check.passed,
            "valid_keyids": None if check is None else list(check.valid_keyids),
        }
        print(json.dumps(out, indent=2))
        return EXIT_OK
    rows: list[tuple[str, str]] = [
        ("name", m.name),
        ("version", m.version),
        ("release_counter", str(m.release_counter)),
        ("created", m.created),
        ("task", m.task),
    ]
    if m.runtime is not None:
        rows.append(("runtime", f"{m.runtime.kind} {m.runtime.precision} ({m.runtime.model})"))
    for what, specs in (("input", m.inputs), ("output", m.outputs)):
        for t in specs:
            shape = "[" + ", ".join("N" if d is None else str(d) for d in t.shape) + "]"
            rows.append((what, f"{t.name} {t.dtype} {shape}"))
    if m.labels:
        shown = ", ".join(m.labels[:10]) + (" ..." if len(m.labels) > 10 else "")
        rows.append(("labels", f"{len(m.labels)}: {shown}"))
    if m.detection:
        rows.append(("detection", ", ".join(f"{k} {v}" for k, v in m.detection.items())))
    c = m.compat
    rows.append(
        (
            "compat",
            f"agent >= {c.min_agent_version}; hardware {', '.join(c.hardware_classes) or 'any'}; "
            f"runtime {', '.join(c.runtime_features) or '-'}",
        )
    )
    for key, value in m.gate.items():
        rows.append(("gate", f"{key} = {value:g}"))
    if check is None:
        sig_text = f"{len(head.signatures)} (not checked: give --keyring)"
    else:
        sig_text = check.summary()
    rows.append(("signatures", sig_text))
    print(format_table(("field", "value"), rows))
    print()
    print(
        format_table(
            ("file", "bytes", "sha256"),
            [(f.path, f.size, f.sha256[:16] + "...") for f in m.files],
        )
    )
    return EXIT_OK


def add_commands(sub: SubParsers) -> None:
    """Add `keys ...` and `package ...` subcommand groups."""
    _add_keys(sub)
    pkg = sub.add_parser("package", help="build, sign, verify and inspect model packages")
    pkg_sub = pkg.add_subparsers(dest="package_command", metavar="COMMAND", required=True)
    _add_package_build(pkg_sub)
    _add_package_sign(pkg_sub)
    _add_package_sign_revert(pkg_sub)
    _add_package_verify(pkg_sub)
    _add_package_inspect(pkg_sub)


def _add_keys(sub: SubParsers) -> None:
    keys = sub.add_parser("keys", help="create signing keys and device keyrings")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    p = add_command(
        keys_sub,
        "generate",
        cmd_keys_generate,
        "Create an Ed25519 key pair: <name>.key (PKCS#8 PEM, 0600) and <name>.pub.json.",
        "edge-agent keys generate --role release --name release-1 --out keys/",
    )
    p.add_argument("--role", required=True, choices=ROLES, help="what the key signs")
    p.add_argument("--out", required=True, help="directory for the key files")
    p.add_argument("--name", help="file name stem (default: the role)")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt with the passphrase in $VAR")
    p.add_argument("--prompt-passphrase", action="store_true", help="ask for a passphrase")

    p = add_command(
        keys_sub,
        "keyring",
        cmd_keys_keyring,
        "Assemble a device keyring directory (keyring.json + *.pub.json) from public keys.",
        "edge-agent keys keyring --out keyring/ --threshold 2 keys/release-*.pub.json",
    )
    p.add_argument("public_keys", nargs="+", metavar="PUB", help="*.pub.json files")
    p.add_argument("--out", required=True, help="keyring directory to write")
    p.add_argument(
        "--threshold", type=int, default=1, help="release signatures required (default 1)"
    )
    p.add_argument(
        "--rollout-threshold", type=int, default=1, help="rollout signatures required (default 1)"
    )
    p.add_argument(
        "--revoke", action="append", default=[], metavar="KEYID", help="revoke a key id; repeat"
    )
    p.add_argument(
        "--keyring-version", type=int, default=1, help="raise on every rotation (default 1)"
    )

    p = add_command(
        keys_sub,
        "update-package",
        cmd_keys_update_package,
        "Build an unsigned keyring-update package (rotation/revocation) from a keyring dir.",
        "edge-agent keys update-package --keyring new-keyring/ --version 2.0.0 "
        "--release-counter 2 --out dist/",
    )
    p.add_argument("--keyring", required=True, help="the NEW keyring directory")
    p.add_argument("--version", required=True, help="version of the update package, e.g. 2.0.0")
    p.add_argument(
        "--release-counter", type=int, required=True, help="above every earlier update's"
    )
    p.add_argument("--out", required=True, help="output directory or .tar path")

    p = add_command(
        keys_sub,
        "apply-update",
        cmd_keys_apply_update,
        "Verify a keyring-update package with the current keyring and install it.",
        "edge-agent keys apply-update dist/keyring-2.0.0.tar --keyring /var/lib/edge-agent/keyring",
    )
    p.add_argument("package", help="keyring-update package .tar")
    p.add_argument("--keyring", required=True, help="the device's current keyring directory")


def _add_package_build(pkg_sub: SubParsers) -> None:
    p = add_command(
        pkg_sub,
        "build",
        cmd_package_build,
        "Build an unsigned package from a model, a schema YAML and labels "
        "(the model's real inputs/outputs must match the schema).",
        "edge-agent package build --model digits_fp32.onnx --schema schema.yaml "
        "--labels labels.txt --out dist/",
    )
    p.add_argument("--model", required=True, help="model file (.onnx, .tflite, .engine)")
    p.add_argument("--schema", required=True, help="YAML: name, version, runtime, inputs, ...")
    p.add_argument("--labels", help="text file, one label per line")
    p.add_argument("--out", required=True, help="output directory or .tar path")
    p.add_argument("--name", help="package name (default: the schema's name)")
    p.add_argument("--version", help="package version (default: the schema's version)")
    p.add_argument(
        "--release-counter", type=int, help="anti-downgrade counter (default: the schema's)"
    )
    p.add_argument(
        "--file", action="append", default=[], metavar="NAME=PATH", help="extra file; repeat"
    )
    p.add_argument("--no-check-model", action="store_true", help="skip loading the model")


def _add_package_sign(pkg_sub: SubParsers) -> None:
    p = add_command(
        pkg_sub,
        "sign",
        cmd_package_sign,
        "Add one signature to a package (each signer runs this with their key).",
        "edge-agent package sign dist/digits-1.1.0.tar --key keys/release-1.key",
    )
    p.add_argument("package", help="package .tar (rewritten in place)")
    p.add_argument("--key", required=True, help="Ed25519 private key (.key)")
    p.add_argument("--passphrase-env", metavar="VAR", help="the key's passphrase is in $VAR")


def _add_package_sign_revert(pkg_sub: SubParsers) -> None:
    p = add_command(
        pkg_sub,
        "sign-revert",
        cmd_package_sign_revert,
        "Create or add one release signature to a revert authorisation: the only thing that "
        "lets devices go below their release floor (to an older published release). Publish "
        "it with `edge-agent publish`, then point the channel at that release.",
        "edge-agent package sign-revert --package digits --version 1.0.0 "
        "--release-counter 1 --max-floor 2 --key keys/release-1.key --out dist/",
    )
    p.add_argument("--package", help="package name (to create the file)")
    p.add_argument("--version", help="the older published version devices may go back to")
    p.add_argument("--release-counter", type=int, help="that version's release_counter")
    p.add_argument(
        "--max-floor",
        type=int,
        help="the highest device floor this revert applies to (the bad release's counter)",
    )
    p.add_argument("--key", required=True, help="Ed25519 release private key (.key)")
    p.add_argument("--passphrase-env", metavar="VAR", help="the key's passphrase is in $VAR")
    p.add_argument(
        "--out", required=True, help="output directory or <name>-<version>.revert.json path"
    )


def _add_package_verify(pkg_sub: SubParsers) -> None:
    p = add_command(
        pkg_sub,
        "verify",
        cmd_package_verify,
        "Check a package as a device would (exit 0 valid, 3 refused with the reason).",
        "edge-agent package verify dist/digits-1.1.0.tar --keyring keyring/",
    )
    p.add_argument("package", help="package .tar")
    p.add_argument("--keyring", required=True, help="keyring directory (keyring.json + keys)")
    p.add_argument(
        "--role", default="release", choices=ROLES, help="signer role to require (default release)"
    )
    p.add_argument("--hardware-class", help="also check compat for this hardware class")
    p.add_argument("--agent-version", help="also check compat for this agent version")


def _add_package_inspect(pkg_sub: SubParsers) -> None:
    p = add_command(
        pkg_sub,
        "inspect",
        cmd_package_inspect,
        "Show a package's manifest and signatures (a table, or --json).",
        "edge-agent package inspect dist/digits-1.1.0.tar --keyring keyring/",
    )
    p.add_argument("package", help="package .tar")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--keyring", help="check the signatures against this keyring")
