"""CLI commands for the fleet operator: repo, publish, rollout, serve and device tokens."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.commands import SubParsers, add_command
from agent.errors import EXIT_USAGE, UsageError

KEYS_HELP = "folder of *.pub.json / *.key files (only the roles this step signs need .key)"


def _keys(path: Path) -> list[Any]:
    from agent.fleet.keys import load_key_dir

    return list(load_key_dir(path))


def _nested(parser: argparse.ArgumentParser, dest: str) -> SubParsers:
    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    parser.set_defaults(handler=show_help)
    return parser.add_subparsers(dest=dest, metavar="COMMAND", parser_class=type(parser))


# --- repo ---------------------------------------------------------------------------------


def _repo_init(args: argparse.Namespace) -> int:
    from agent.fleet.repo import init_repo

    repo = init_repo(args.dir, _keys(args.keys), args.release_threshold, args.root_threshold)
    print(f"repository created in {args.dir}")
    print(f"  serve {args.dir}/metadata and {args.dir}/targets over HTTP(S)")
    print(f"  provision devices with {args.dir}/metadata/1.root.json")
    print(f"  root expires {repo.root.signed.expires.isoformat()}")
    return 0


def _repo_refresh(args: argparse.Namespace) -> int:
    from agent.fleet.repo import refresh_repo

    result = refresh_repo(args.dir, _keys(args.keys))
    print(f"re-signed: {', '.join(result.resigned)}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    return 0


def _repo_rotate_root(args: argparse.Namespace) -> int:
    from agent.fleet.keys import keys_for_role
    from agent.fleet.repo import rotate_root_keys

    new_keys = keys_for_role(_keys(args.new_keys), "root")
    if not new_keys:
        raise UsageError(f"{args.new_keys}: no root key (*.pub.json with role 'root')")
    version = rotate_root_keys(args.dir, _keys(args.keys), new_keys, args.threshold)
    print(f"root version {version} written, signed by the old and the new root keys")
    return 0


# --- publish ------------------------------------------------------------------------------


def _publish(args: argparse.Namespace) -> int:
    from agent.fleet.repo import publish_package, publish_revert
    from agent.package.revert import REVERT_SUFFIX

    if args.package.name.endswith(REVERT_SUFFIX):
        pkg = publish_revert(args.repo, args.package, _keys(args.keys))
        print(
            f"published revert to {pkg.name} {pkg.version} (release_counter {pkg.release_counter})"
        )
        print(f"  target {pkg.target}  {pkg.length} bytes  sha256 {pkg.sha256[:16]}...")
        return 0

    pkg = publish_package(args.repo, args.package, _keys(args.keys), channel=args.channel)
    print(f"published {pkg.name} {pkg.version} (release_counter {pkg.release_counter})")
    print(f"  target {pkg.target}  {pkg.length} bytes  sha256 {pkg.sha256[:16]}...")
    return 0


# --- rollout ------------------------------------------------------------------------------


def _policy(args: argparse.Namespace) -> Any:
    from agent.fleet.rollout import RolloutPolicy, policy_from_mapping

    data: dict[str, Any] = {}
    source = "rollout policy"
    if args.policy is not None:
        # The channel policy file: RolloutPolicy's keys (docs/fleet.md, "Quality policy");
        # the flags given on the command line override its values.
        from agent.config import load_yaml_file

        source = str(args.policy)
        loaded = load_yaml_file(args.policy)
        if not isinstance(loaded, dict):
            raise UsageError(f"{args.policy}: a rollout policy is a mapping of keys")
        data = dict(loaded)
    if args.stages is not None:
        try:
            data["stages_percent"] = [float(s) for s in args.stages.split(",")]
        except ValueError:
            raise UsageError(f"--stages {args.stages!r}: expected numbers like 1,10,100") from None
    for key in ("soak_s", "min_devices", "max_failure_rate"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.no_auto_promote:
        data["auto_promote"] = False
    if args.no_auto_abort:
        data["auto_abort"] = False
    policy: RolloutPolicy = policy_from_mapping(data, source=source)
    problem = policy.check()
    if problem:
        raise UsageError(f"rollout policy: {problem}")
    return policy


def _print_state(state: Any) -> None:
    from agent.fleet.label import stage_label

    flags = " (paused)" if state.paused else " (aborted)" if state.aborted else ""
    stage = stage_label(state.stage, len(state.policy.stages_percent))
    print(
        f"{state.channel}: {state.package} {state.version} at stage {stage} = "
        f"{state.percent:g}%{flags}"
    )


def _rollout_start(args: argparse.Namespace) -> int:
    from agent.fleet.rollout import start_rollout

    state = start_rollout(
        args.repo,
        args.channel,
        args.version,
        _keys(args.keys),
        _policy(args),
        package=args.package,
    )
    _print_state(state)
    return 0


def _rollout_promote(args: argparse.Namespace) -> int:
    from agent.fleet.rollout import promote

    state = promote(args.repo, args.channel, _keys(args.keys), reason="operator")
    if state.completed:
        print(f"{state.channel}: {state.package} {state.version} rollout complete")
    else:
        _print_state(state)
    return 0


def _rollout_pause(args: argparse.Namespace) -> int:
    from agent.fleet.rollout import set_paused

    _print_state(set_paused(args.repo, args.channel, True, _keys(args.keys)))
    return 0


def _rollout_resume(args: argparse.Namespace) -> int:
    from agent.fleet.rollout import set_paused

    _print_state(set_paused(args.repo, args.channel, False, _keys(args.keys)))
    return 0


def _rollout_abort(args: argparse.Namespace) -> int:
    from agent.fleet.rollout import abort

    state = abort(args.repo, args.channel, _keys(args.keys), reason="operator")
    _print_state(state)
    print(f"  devices on {state.version} will roll back to their previous version")
    return 0


def _fetch_status(server: str, channel: str, token: str | None) -> dict[str, Any]:
    url = f"{server.rstrip('/')}/api/rollouts/{channel}"
    if not token:
        raise UsageError(
            f"{url}: reading the server needs an operator token "
            "(--operator-token or $EDGE_AGENT_OPERATOR_TOKEN; see token add --operator)"
        )
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read(1 << 22))
            return data
    except urllib.error.HTTPError as exc:
        raise UsageError(f"{url}: server answered {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UsageError(f"{url}: cannot read rollout status ({exc})") from None


def _rollout_status(args: argparse.Namespace) -> int:
    from agent.fleet.label import rollout_state_word, stage_label
    from agent.fleet.repo import utc_now
    from agent.textio import format_table

    if args.server:
        token = args.operator_token or os.environ.get("EDGE_AGENT_OPERATOR_TOKEN")
        st = _fetch_status(args.server, args.channel, token)
    else:
        from agent.fleet.open_store import is_database_url, open_store
        from agent.fleet.rollout import load_state
        from agent.fleet.status import rollout_status

        if args.repo is None or args.db is None:
            raise UsageError("rollout status needs --server URL, or --repo DIR and --db FILE|URL")
        if not is_database_url(args.db) and not Path(args.db).exists():
            raise UsageError(f"{args.db}: telemetry database not found")
        store = open_store(str(args.db))
        try:
            st = rollout_status(load_state(args.repo, args.channel), store, utc_now())
        finally:
            store.close()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"channel {st['channel']}: {st['package']} {st['version']} ({rollout_state_word(st)})")
    print(
        format_table(
            ["stage", "percent", "members", "committed", "failed", "failure rate", "next", "in"],
            [
                [
                    stage_label(st["stage"], len(st["stages_percent"])),
                    f"{st['percent']:g}%",
                    st["members_known"],
                    st["committed"],
                    st["failed"],
                    f"{st['failure_rate']:.1%} (max {st['max_failure_rate']:.1%})",
                    f"{st['next_decision']}: {st['next_reason']}",
                    f"{st['soak_left_s']:.0f} s",
                ]
            ],
        )
    )
    broke = st.get("quality_abort")
    if broke:
        print(
            f"aborted at stage {int(broke['stage']) + 1} ({broke['percent']:g}%) on quality: "
            f"{broke['figure']} broke on {broke['breaching']} of {broke['reporting']} "
            "reporting devices"
        )
    figures = st.get("quality") or []
    if figures:
        print()
        print(
            format_table(
                ["quality", "needs", "reporting", "breaching", "worst"],
                [_figure_row(f) for f in figures],
            )
        )
    rows = [[v["version"], v["state"], v["devices"]] for v in st["devices_by_version_state"]]
    if rows:
        print()
        print(format_table(["version", "state", "devices"], rows))
    return 0


def _figure_row(figure: dict[str, Any]) -> list[Any]:
    """One quality check of `rollout status`: what it needs, and how the stage fares."""
    what = {"ratio": " x old", "delta": " over old"}.get(figure["compare"], "")
    side = ">=" if figure["kind"] == "min" else "<="
    worst = figure["worst"]
    return [
        figure["figure"],
        f"{side} {figure['threshold']:g}{what}",
        figure["reporting"],
        figure["breaching"],
        "-" if worst is None else f"{worst:.4g}",
    ]


# --- serve and tokens ---------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("serve needs the server extra: pip install 'edge-agent[server]'") from None
    from agent.fleet.open_store import open_store
    from agent.fleet.server import ServerConfig, serve

    if not (args.repo / "metadata" / "1.root.json").exists():
        raise UsageError(f"{args.repo}: not a repository (run repo init first)")
    config = ServerConfig(
        repo_dir=args.repo,
        db_url=str(args.db),
        tokens_path=args.tokens,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        controller_interval_s=args.controller_interval_s,
    )
    keys = _keys(args.keys) if args.keys else []
    _check_port_free(args.host, args.port)
    store = open_store(config.db_url)
    try:
        serve(config, store, keys)
    except SystemExit as exc:
        # uvicorn logs a failed bind and exits 1; a port taken since the check above is
        # still the user's to change, not a bug
        if exc.code not in (0, None):
            raise UsageError(
                f"{args.host}:{args.port}: the server could not start (port in use?) (serve --port)"
            ) from None
    finally:
        store.close()
    return 0


def _check_port_free(host: str, port: int) -> None:
    """UsageError (exit 2) when ``host:port`` cannot be bound, before anything starts."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(
            f"{host}: cannot resolve the listen address ({exc}) (serve --host)"
        ) from None
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        # as uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT is not "in use"
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
    except OSError as exc:
        raise UsageError(
            f"{host}:{port}: cannot listen there ({exc.strerror or exc}; another server "
            "may hold the port) (serve --port)"
        ) from None
    finally:
        probe.close()


def _token_add(args: argparse.Namespace) -> int:
    from agent.fleet.tokens import add_device_token, add_operator_token

    if args.operator is not None:
        token = add_operator_token(args.tokens, args.operator)
        print(token)
        sys.stderr.write(
            f"operator token for {args.operator} stored (as sha256) in {args.tokens}; log in "
            "to the fleet page with it, or send 'Authorization: Bearer <token>' to /api/; "
            "restart the server to load it\n"
        )
        return 0
    token = add_device_token(args.tokens, args.device)
    print(token)
    sys.stderr.write(
        f"token for {args.device} stored (as sha256) in {args.tokens}; put it in the "
        "device's telemetry.headers.Authorization as 'Bearer <token>'\n"
    )
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from agent.fleet.tokens import revoke_device_token, revoke_operator_token

    if args.operator is not None:
        revoke_operator_token(args.tokens, args.operator)
        print(f"operator token of {args.operator} revoked")
        return 0
    revoke_device_token(args.tokens, args.device)
    print(f"token of {args.device} revoked")
    return 0


# --- wiring -------------------------------------------------------------------------------


def _repo_args(p: argparse.ArgumentParser, keys: bool = True) -> None:
    p.add_argument("--repo", type=Path, required=True, help="repository folder")
    if keys:
        p.add_argument("--keys", type=Path, required=True, help=KEYS_HELP)
    p.add_argument("--channel", required=True, help="channel name, e.g. stable")


def add_commands(sub: SubParsers) -> None:
    """Add repo, publish, rollout, serve and token."""
    _add_repo(sub)
    _add_publish(sub)
    _add_rollout(sub)
    _add_serve(sub)
    _add_token(sub)


def _add_repo(sub: SubParsers) -> None:
    repo = add_command(
        sub,
        "repo",
        lambda a: EXIT_USAGE,
        "create and maintain a TUF repository",
        "edge-agent repo init ./repo --keys ./keys",
    )
    repo_sub = _nested(repo, "repo_action")
    p = add_command(
        repo_sub,
        "init",
        _repo_init,
        "create root, targets (delegating release and rollout), snapshot, timestamp",
        "edge-agent repo init ./repo --keys ./keys --release-threshold 2",
    )
    p.add_argument("dir", type=Path, help="new repository folder")
    p.add_argument("--keys", type=Path, required=True, help=KEYS_HELP)
    p.add_argument(
        "--release-threshold",
        type=int,
        default=1,
        help="release signatures a package needs (default 1)",
    )
    p.add_argument("--root-threshold", type=int, default=1, help="root signatures (default 1)")
    p = add_command(
        repo_sub,
        "refresh",
        _repo_refresh,
        "re-sign timestamp (and snapshot/rollout near expiry); run from cron",
        "edge-agent repo refresh ./repo --keys ./online-keys",
    )
    p.add_argument("dir", type=Path, help="repository folder")
    p.add_argument(
        "--keys", type=Path, required=True, help="online keys: snapshot, timestamp, rollout"
    )
    p = add_command(
        repo_sub,
        "rotate-root",
        _repo_rotate_root,
        "write a new root version trusting new root keys (old and new both sign)",
        "edge-agent repo rotate-root ./repo --keys ./keys --new-keys ./new-root-keys",
    )
    p.add_argument("dir", type=Path, help="repository folder")
    p.add_argument("--keys", type=Path, required=True, help="folder with the current root keys")
    p.add_argument("--new-keys", type=Path, required=True, help="folder with the new root keys")
    p.add_argument("--threshold", type=int, default=1, help="new root threshold (default 1)")


def _add_publish(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "publish",
        _publish,
        "add a signed package (or a signed revert authorisation, *.revert.json) to the "
        "repository (refuses unsigned, older, mismatched)",
        "edge-agent publish digits-1.1.0.tar --repo ./repo --keys ./keys\n  "
        "edge-agent publish dist/digits-1.0.0.revert.json --repo ./repo --keys ./keys",
    )
    p.add_argument(
        "package",
        type=Path,
        help="package tar built by `package build`, or a `package sign-revert` file",
    )
    p.add_argument("--repo", type=Path, required=True, help="repository folder")
    p.add_argument(
        "--keys",
        type=Path,
        required=True,
        help="release keys (threshold) plus snapshot and timestamp keys",
    )
    p.add_argument("--channel", help="refuse unless the package matches this channel's package")


def _add_rollout(sub: SubParsers) -> None:
    rollout = add_command(
        sub,
        "rollout",
        lambda a: EXIT_USAGE,
        "staged rollouts: start, promote, pause, resume, abort, status",
        "edge-agent rollout status --channel stable --server http://fleet:8080",
    )
    r_sub = _nested(rollout, "rollout_action")
    _add_rollout_start(r_sub)
    for name, handler, text in (
        ("promote", _rollout_promote, "move to the next stage now"),
        ("pause", _rollout_pause, "stop new installs; the controller holds"),
        ("resume", _rollout_resume, "resume a paused rollout"),
        ("abort", _rollout_abort, "stop the release; devices on it roll back"),
    ):
        p = add_command(
            r_sub,
            name,
            handler,
            text,
            f"edge-agent rollout {name} --channel stable --repo ./repo --keys ./keys",
        )
        _repo_args(p)
    _add_rollout_status(r_sub)


def _add_rollout_start(r_sub: SubParsers) -> None:
    p = add_command(
        r_sub,
        "start",
        _rollout_start,
        "start rolling a published release out",
        "edge-agent rollout start --channel stable --version 1.1.0 --repo ./repo "
        "--keys ./keys --stages 1,10,100 --soak-s 3600\n  "
        "edge-agent rollout start --channel stable --version 1.1.0 --repo ./repo "
        "--keys ./keys --policy channel-policy.yaml",
    )
    _repo_args(p)
    p.add_argument("--version", required=True, help="published package version")
    p.add_argument("--package", help="package name (needed for a new channel with ambiguity)")
    p.add_argument(
        "--policy",
        type=Path,
        help="channel policy file (YAML): stages_percent, soak_s, min_devices, "
        "max_failure_rate, quality: {shadow_agreement_min: 0.9, ...}; flags override it",
    )
    p.add_argument("--stages", help="percent per stage (default 1,10,100)")
    p.add_argument("--soak-s", type=float, help="minimum time per stage (default 3600)")
    p.add_argument(
        "--min-devices",
        type=int,
        help="reports needed per stage, capped at the stage's known devices (default 2)",
    )
    p.add_argument(
        "--max-failure-rate",
        type=float,
        help="abort over this share of failed devices (default 0.05)",
    )
    p.add_argument("--no-auto-promote", action="store_true", help="promote only by hand")
    p.add_argument("--no-auto-abort", action="store_true", help="hold instead of aborting")


def _add_rollout_status(r_sub: SubParsers) -> None:
    p = add_command(
        r_sub,
        "status",
        _rollout_status,
        "stage, devices per version and state, failure rate, next decision",
        "edge-agent rollout status --channel stable --repo ./repo --db fleet.db\n  "
        "edge-agent rollout status --channel stable --repo ./repo "
        "--db postgresql://fleet@db.example:5432/fleet",
    )
    p.add_argument("--channel", required=True, help="channel name")
    p.add_argument("--repo", type=Path, help="repository folder (with --db)")
    p.add_argument(
        "--db",
        help="the server's telemetry database: SQLite path or postgresql://user@host/db URL",
    )
    p.add_argument("--server", help="ask a running server instead, e.g. http://fleet:8080")
    p.add_argument(
        "--operator-token",
        help="operator token for --server (default: $EDGE_AGENT_OPERATOR_TOKEN)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_serve(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "serve",
        _serve,
        "reference fleet server: repository files, OTLP ingest, rollout controller",
        "edge-agent serve --repo ./repo --db fleet.db --tokens tokens.json "
        "--keys ./online-keys --port 8080\n  "
        "edge-agent serve --repo ./repo --db postgresql://fleet@db.example:5432/fleet "
        "--tokens tokens.json --port 8080",
    )
    p.add_argument("--repo", type=Path, required=True, help="repository folder to serve")
    p.add_argument(
        "--db",
        default="fleet.db",
        help="telemetry database: SQLite path (default fleet.db) or "
        "postgresql://user@host:5432/db URL (see docs/fleet.md)",
    )
    p.add_argument("--tokens", type=Path, help="device tokens file (without it all writes get 401)")
    p.add_argument(
        "--keys", type=Path, help="online keys (rollout, snapshot, timestamp) to run the controller"
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    p.add_argument(
        "--max-body-bytes", type=int, default=4 << 20, help="request size limit (default 4194304)"
    )
    p.add_argument(
        "--controller-interval-s",
        type=float,
        default=60.0,
        help="how often the rollout controller runs (default 60)",
    )


def _add_token(sub: SubParsers) -> None:
    token = add_command(
        sub,
        "token",
        lambda a: EXIT_USAGE,
        "device upload tokens and operator read tokens",
        "edge-agent token add --tokens tokens.json --device cam-001\n  "
        "edge-agent token add --tokens tokens.json --operator alice",
    )
    t_sub = _nested(token, "token_action")
    for name, handler, text in (
        ("add", _token_add, "create a device's or operator's token and print it once"),
        ("revoke", _token_revoke, "remove a device's or operator's token"),
    ):
        p = add_command(
            t_sub,
            name,
            handler,
            text,
            f"edge-agent token {name} --tokens tokens.json --device cam-001\n  "
            f"edge-agent token {name} --tokens tokens.json --operator alice",
        )
        p.add_argument("--tokens", type=Path, required=True, help="tokens file")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--device", help="device id (an upload token)")
        who.add_argument(
            "--operator", help="operator name (a read token for the fleet page and /api/)"
        )
