"""doctor against fake sysfs/dev/proc trees (Pi, Jetson, bare box) and a real HTTP server."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import AgentConfig, OTAConfig, SourceConfig
from agent.doctor import CheckResult, DoctorEnv, blocking, check_backends, run_doctor

from .conftest import (
    UNIT,
    install_unit,
    make_bare_tree,
    make_etc,
    make_jetson_tree,
    make_pi_tree,
    write,
)

NOW_2026 = 1_795_000_000.0  # 2026-11-19


def no_commands(argv: Sequence[str]) -> tuple[int, str] | None:
    return None  # nothing installed: no timedatectl, no vcgencmd


def env_for(root: Path, state_dir: Path, **kwargs: object) -> DoctorEnv:
    base = DoctorEnv(
        sysfs_root=root / "sys",
        dev_root=root / "dev",
        proc_root=root / "proc",
        state_dir=state_dir,
        run_command=no_commands,
        now_s=lambda: NOW_2026,
        kernel_clock_synced=lambda: True,
        repo_timeout_s=1.0,
        etc_root=root / "etc",
        unit_dirs=(root / "etc/systemd/system", root / "lib/systemd/system"),
    )
    return replace(base, **kwargs)  # type: ignore[arg-type]


def by_name(rows: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in rows}


def test_raspberry_pi(tmp_path: Path, state_dir: Path) -> None:
    root = make_pi_tree(tmp_path / "pi", throttled="0x50005")
    rows = by_name(run_doctor(AgentConfig(), env_for(root, state_dir)))
    assert rows["board"].detail == "Raspberry Pi 4 Model B Rev 1.4"
    assert rows["sensors"].status == "ok" and "cpu-thermal 48.3 C" in rows["sensors"].detail
    # 0x50005: under-voltage and throttled now, and since boot
    assert rows["throttle"].status == "warn"
    assert "under-voltage" in rows["throttle"].detail and "power supply" in rows["throttle"].fix
    assert rows["camera"].status == "ok" and "video0" in rows["camera"].detail
    assert rows["clock"].status == "ok"


def test_pi_throttled_since_boot_only_and_clean(tmp_path: Path, state_dir: Path) -> None:
    root = make_pi_tree(tmp_path / "pi", throttled="0x50000")
    row = by_name(run_doctor(AgentConfig(), env_for(root, state_dir)))["throttle"]
    assert row.status == "warn" and "since boot: under_voltage, throttled" in row.detail
    clean = make_pi_tree(tmp_path / "pi2", throttled="0x0")
    row = by_name(run_doctor(AgentConfig(), env_for(clean, state_dir)))["throttle"]
    assert row.status == "ok"


def test_pi_without_sysfs_file_asks_vcgencmd(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "old-pi")
    calls: list[list[str]] = []

    def commands(argv: Sequence[str]) -> tuple[int, str] | None:
        calls.append(list(argv))
        return (0, "throttled=0x4\n") if argv[0] == "vcgencmd" else None

    rows = by_name(run_doctor(AgentConfig(), env_for(root, state_dir, run_command=commands)))
    assert ["vcgencmd", "get_throttled"] in calls
    assert rows["throttle"].status == "warn" and "throttled" in rows["throttle"].detail


def test_jetson(tmp_path: Path, state_dir: Path) -> None:
    root = make_jetson_tree(tmp_path / "jetson")
    rows = by_name(run_doctor(AgentConfig(), env_for(root, state_dir)))
    assert rows["board"].detail.startswith("NVIDIA Jetson Orin Nano")
    sensors = rows["sensors"]
    assert sensors.status == "ok"
    assert "4 temperatures, hottest tj-thermal 52.0 C" in sensors.detail
    # VDD_IN 6 W, VDD_CPU_GPU_CV 2 W, VDD_SOC 1.5 W: the last two are parts of VDD_IN
    assert "3 power rails, 6.00 W (VDD_IN (module input))" in sensors.detail
    assert rows["throttle"].status == "skip"
    assert rows["camera"].status == "skip"


def test_hot_board_warns(tmp_path: Path, state_dir: Path) -> None:
    root = make_pi_tree(tmp_path / "pi", temp_milli_c=81_000)
    row = by_name(run_doctor(AgentConfig(), env_for(root, state_dir)))["sensors"]
    assert row.status == "warn" and "soft limit" in row.detail and "cooling" in row.fix


def test_box_without_sensors(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    rows = run_doctor(AgentConfig(), env_for(root, state_dir))
    named = by_name(rows)
    assert named["sensors"].status == "warn" and named["sensors"].fix
    assert named["board"].detail.startswith("no device-tree model")
    assert named["camera"].status == "skip"
    # nothing here blocks a box that only runs the demo without OTA
    assert blocking(rows) == []


def test_camera_source_without_camera_blocks(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    cfg = AgentConfig(source=SourceConfig(kind="camera"))
    rows = run_doctor(cfg, env_for(root, state_dir))
    assert [r.name for r in blocking(rows)] == ["camera"]


def test_clock_before_2024_blocks(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    rows = run_doctor(AgentConfig(), env_for(root, state_dir, now_s=lambda: 0.0))
    clock = by_name(rows)["clock"]
    assert clock.status == "fail" and "1970-01-01" in clock.detail and "timedatectl" in clock.fix


@pytest.mark.parametrize(
    ("answer", "kernel", "status", "source"),
    [
        ((0, "yes\n"), None, "ok", "timedatectl"),
        ((0, "no\n"), None, "warn", "timedatectl"),
        (None, True, "ok", "adjtimex"),
        (None, False, "warn", "adjtimex"),
        ((1, "System has not been booted with systemd"), False, "warn", "adjtimex"),
    ],
)
def test_clock_sync_sources(
    tmp_path: Path,
    state_dir: Path,
    answer: tuple[int, str] | None,
    kernel: bool | None,
    status: str,
    source: str,
) -> None:
    def commands(argv: Sequence[str]) -> tuple[int, str] | None:
        return answer if argv[0] == "timedatectl" else None

    env = env_for(
        make_bare_tree(tmp_path / "vm"),
        state_dir,
        run_command=commands,
        kernel_clock_synced=lambda: kernel,
    )
    clock = by_name(run_doctor(AgentConfig(), env))["clock"]
    assert clock.status == status and source in clock.detail


def test_state_dir_problems(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    state_dir.chmod(0o777)
    row = by_name(run_doctor(AgentConfig(), env_for(root, state_dir)))["state dir"]
    assert row.status == "fail" and "world-writable" in row.detail and "chmod 0750" in row.fix
    missing = tmp_path / "nope"
    row = by_name(run_doctor(AgentConfig(), env_for(root, missing)))["state dir"]
    assert row.status == "warn" and "does not exist" in row.detail
    a_file = tmp_path / "file"
    a_file.write_text("x")
    row = by_name(run_doctor(AgentConfig(), env_for(root, a_file)))["state dir"]
    assert row.status == "fail"


def test_keyring_needed_only_with_ota(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    rows = by_name(run_doctor(AgentConfig(), env_for(root, state_dir)))
    assert rows["keyring"].status == "warn" and "edge-agent provision" in rows["keyring"].fix
    ota = AgentConfig(ota=OTAConfig(enabled=True))
    rows = by_name(run_doctor(ota, env_for(root, state_dir)))
    assert rows["keyring"].status == "fail" and rows["tuf root"].status == "fail"


def test_broken_keyring_fails(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    (state_dir / "keyring").mkdir()
    (state_dir / "keyring" / "keyring.json").write_text("{not json")
    row = by_name(run_doctor(AgentConfig(), env_for(root, state_dir)))["keyring"]
    assert row.status == "fail"


class _Repo(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        code = 200 if self.path == "/repo/metadata/timestamp.json" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def repo_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Repo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_repository_reachable_wrong_and_down(
    tmp_path: Path, state_dir: Path, repo_url: str
) -> None:
    root = make_bare_tree(tmp_path / "vm")

    def repo_row(url: str) -> CheckResult:
        cfg = AgentConfig(ota=OTAConfig(repository_url=url))
        return by_name(run_doctor(cfg, env_for(root, state_dir)))["repository"]

    assert repo_row(repo_url + "/repo").status == "ok"
    wrong = repo_row(repo_url + "/elsewhere")
    assert wrong.status == "fail" and "HTTP 404" in wrong.detail
    # a port nobody listens on: offline is normal for a device, so only a warning
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    down = repo_row(f"http://127.0.0.1:{closed_port}")
    assert down.status == "warn" and "unreachable" in down.detail
    assert by_name(run_doctor(AgentConfig(), env_for(root, state_dir)))["repository"].status == (
        "skip"
    )


def test_backends_report_providers_and_missing_ones() -> None:
    rows = by_name(check_backends(AgentConfig()))
    assert rows["backend onnx"].status == "ok"
    assert "CPUExecutionProvider" in rows["backend onnx"].detail

    def nothing_loads(backend: str) -> str:
        raise ImportError(f"No module named {backend!r}")

    rows = by_name(check_backends(AgentConfig(), load=nothing_loads))
    assert rows["backends"].status == "fail"


def test_cli_table_json_and_exit_codes(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_pi_tree(tmp_path / "pi")
    args = [
        "doctor",
        "--state-dir", str(state_dir),
        "--sysfs-root", str(root / "sys"),
        "--dev-root", str(root / "dev"),
        "--proc-root", str(root / "proc"),
    ]  # fmt: skip
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("source: {kind: camera, device: 0}\n")
    code = main([*args, "--config", str(cfg), "--json"])
    report = json.loads(capsys.readouterr().out)
    names = {c["name"]: c for c in report["checks"]}
    assert names["camera"]["status"] == "ok" and names["board"]["detail"].startswith("Raspberry")
    assert code == (0 if report["ok"] else 3)

    cfg.write_text("source: {kind: camera, device: 3}\n")
    code = main([*args, "--config", str(cfg)])
    out = capsys.readouterr().out
    assert code == 3
    assert "blocking problem(s): camera" in out and "FAIL" in out

    cfg.write_text("source: {kind: camra}\n")
    assert main([*args, "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("Error: ")


# ------------------------------------------------------------------ service user


def service_rows(
    root: Path, state_dir: Path, cfg: AgentConfig | None = None
) -> dict[str, CheckResult]:
    rows = run_doctor(cfg or AgentConfig(), env_for(root, state_dir))
    return {r.name: r for r in rows if r.name in ("service user", "state dir owner")}


def test_service_user_installed_by_the_deb(tmp_path: Path, state_dir: Path) -> None:
    root = make_pi_tree(tmp_path / "pi")
    make_etc(root, uid=os.getuid())
    install_unit(root / "lib/systemd/system")
    rows = service_rows(root, state_dir)
    assert rows["service user"].status == "ok"
    assert rows["service user"].detail == f"edge-agent uid {os.getuid()}, in the video group"
    assert "state dir owner" not in rows  # the state dir belongs to the service user


def test_unit_without_its_user_blocks(tmp_path: Path, state_dir: Path) -> None:
    root = make_pi_tree(tmp_path / "pi")
    make_etc(root, user=False)
    unit = install_unit(root / "lib/systemd/system")
    rows = run_doctor(AgentConfig(), env_for(root, state_dir))
    row = by_name(rows)["service user"]
    assert row.status == "fail" and [r.name for r in blocking(rows)] == ["service user"]
    assert str(unit) in row.detail and "User=edge-agent" in row.detail
    assert "adduser --system --group" in row.fix and "edge-agent" in row.fix


def test_no_unit_and_no_user_is_a_pip_install(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "laptop")
    make_etc(root, user=False)
    rows = service_rows(root, state_dir)
    assert rows["service user"].status == "skip"
    assert "not installed as a service" in rows["service user"].detail


def test_not_in_video_group(tmp_path: Path, state_dir: Path) -> None:
    root = make_pi_tree(tmp_path / "pi")
    make_etc(root, in_video=False, uid=os.getuid())
    # the shipped unit adds video itself (SupplementaryGroups=video): only a warning
    install_unit(root / "lib/systemd/system")
    row = service_rows(root, state_dir)["service user"]
    assert row.status == "warn" and "SupplementaryGroups=video" in row.detail
    assert row.fix == "sudo adduser edge-agent video"
    # an admin's unit without it, and a camera source: the camera cannot be opened
    plain = UNIT.read_text().replace("SupplementaryGroups=video\n", "")
    install_unit(root / "etc/systemd/system", plain)
    cfg = AgentConfig(source=SourceConfig(kind="camera"))
    row = service_rows(root, state_dir, cfg)["service user"]
    assert row.status == "fail" and "cannot open /dev/video" in row.detail
    assert row.fix == "sudo adduser edge-agent video"


def test_primary_group_video_and_no_video_group(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    etc = make_etc(root, in_video=False, uid=os.getuid())
    passwd = (etc / "passwd").read_text().replace(":999::/var/lib", ":44::/var/lib")
    (etc / "passwd").write_text(passwd)
    assert service_rows(root, state_dir)["service user"].status == "ok"
    make_etc(root, video_group=False, uid=os.getuid())
    row = service_rows(root, state_dir)["service user"]
    assert row.status == "ok" and "no video group" in row.detail


def test_drop_in_user_and_odd_lines(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    install_unit(root / "lib/systemd/system")
    write(root / "etc/systemd/system/edge-agent.service.d/user.conf", "[Service]\nUser=vision\n")
    write(
        root / "etc/passwd",
        "+::::::\nbroken:x:notanumber:1::/:/bin/sh\n\n"
        f"vision:x:{os.getuid()}:50::/home/vision:/bin/sh\n",
    )
    write(root / "etc/group", "video:x:44:vision\n# comment\n")
    row = service_rows(root, state_dir)["service user"]
    assert row.status == "ok" and row.detail.startswith("vision uid")


def test_state_dir_owned_by_someone_else(tmp_path: Path, state_dir: Path) -> None:
    root = make_pi_tree(tmp_path / "pi")
    make_etc(root, uid=os.getuid() + 4242)  # the service user is not who made state_dir
    rows = service_rows(root, state_dir)
    assert rows["service user"].status == "ok"
    owner = rows["state dir owner"]
    assert owner.status == "warn" and "the service runs as edge-agent" in owner.detail
    assert owner.fix == f"sudo chown -R edge-agent:edge-agent {state_dir}"


def test_unreadable_passwd_warns(tmp_path: Path, state_dir: Path) -> None:
    root = make_bare_tree(tmp_path / "vm")
    row = service_rows(root, state_dir)["service user"]
    assert row.status == "warn" and "cannot read" in row.detail and "passwd" in row.detail


def test_cli_etc_root(tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_pi_tree(tmp_path / "pi")
    make_etc(root, in_video=False, uid=os.getuid())
    code = main(["doctor", "--json", "--state-dir", str(state_dir), "--etc-root", str(root / "etc"),
                 "--sysfs-root", str(root / "sys"), "--dev-root", str(root / "dev"),
                 "--proc-root", str(root / "proc")])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    row = {c["name"]: c for c in report["checks"]}["service user"]
    assert row["status"] in ("warn", "fail") and "not in the video group" in row["detail"]
    assert code in (0, 3)
