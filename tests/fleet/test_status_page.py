"""The fleet page in headless Chromium: 200 devices reporting real OTLP, tables and charts."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from fleet_testlib import build_package, make_key_dir, ota_record, running_server

from agent.fleet.ingest import parse_otlp_logs
from agent.fleet.keys import OperatorKey
from agent.fleet.repo import init_repo, publish_package
from agent.fleet.rollout import RolloutPolicy, is_member, load_state, start_rollout
from agent.fleet.server import ServerConfig, create_app
from agent.fleet.status import render_chart_svg
from agent.fleet.store_sqlite import SQLiteTelemetryStore
from agent.fleet.tokens import add_device_token, add_operator_token
from agent.telemetry import otlp
from agent.telemetry.sampler import IntervalSummary
from agent.telemetry.store import StoredRecord

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
DEVICES = 200
SUMMARIES_PER_DEVICE = 12
# EDGE_AGENT_UPDATE_SCREENSHOT=1 also copies the overview to docs/fleet-page.png (README).
DOCS_SCREENSHOT = ROOT / "docs" / "fleet-page.png"


@pytest.fixture()
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(
            "needs /usr/bin/chromium and chromedriver (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(browser: Any, url: str, token: str, path: str = "/") -> None:
    """The operator's way in: the login form (the token lands in an HttpOnly cookie)."""
    from selenium.webdriver.common.by import By

    browser.get(url + path)
    assert "/login" in browser.current_url, "an unauthenticated visit must go to the login form"
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.NAME, "token").send_keys(token)
    button = browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button")
    button.click()
    # click() returns before the POST's answer has replaced the page (seen in CI on a loaded
    # machine): wait for the login page to go away, then judge where the browser landed.
    WebDriverWait(browser, 120).until(expected_conditions.staleness_of(button))
    assert "/login" not in browser.current_url, browser.page_source[:500]


def require_parts(browser: Any, selectors: dict[str, str]) -> dict[str, Any]:
    """Every named table/chart must be on the page; the failure lists all missing ones."""
    from selenium.webdriver.common.by import By

    found = {name: browser.find_elements(By.CSS_SELECTOR, css) for name, css in selectors.items()}
    missing = [f"{name} ({selectors[name]})" for name, els in found.items() if not els]
    assert not missing, f"missing on {browser.current_url}: {', '.join(missing)}"
    return {name: els[0] for name, els in found.items()}


def device_table(browser: Any) -> dict[str, dict[str, str]]:
    """The device table's cells by device id, in page order, read in one round trip."""
    rows = browser.execute_script(
        """
        const names = ["device", "version", "ota_state", "reason", "last_seen",
                       "fps", "p95", "temp", "drift"];
        return [...document.querySelectorAll("table.devices tbody tr.device")].map(tr =>
          Object.fromEntries([...tr.querySelectorAll("td")].map(
            (td, i) => [names[i], td.innerText.trim()])));
        """
    )
    return {row["device"]: row for row in rows}


def screenshot(browser: Any, path: Path) -> Path:
    # Full page: grow the window to the document so the shot is not cut at the viewport.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(max(800, int(height)), 6000))
    assert browser.save_screenshot(str(path)), f"screenshot {path} not written"
    assert path.stat().st_size > 10_000
    return path


# ---------------------------------------------------------------------------------------
# A fleet of 200 devices sending what the agent sends (agent.telemetry.otlp)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    url: str
    base: Path
    operator_token: str
    device_tokens: dict[str, str]
    rejected: list[str]
    on_new: list[str]
    gate_report: dict[str, Any]
    temps_zone: str


def _record(
    device: str, seq: int, type_: str, name: str, t_ns: int, attrs: dict[str, Any]
) -> StoredRecord:
    return StoredRecord(
        id=seq,
        device_id=device,
        boot_id="boot-1",
        seq=seq,
        type=type_,  # type: ignore[arg-type]  # a RowType literal chosen by the caller
        priority=2,
        name=name,
        time_unix_ns=t_ns,
        observed_unix_ns=t_ns,
        clock_ok=True,
        attrs=attrs,
        size_bytes=100,
    )


def _summary(device_no: int, i: int, start_ns: int) -> dict[str, Any]:
    """One interval summary built by the agent's own IntervalSummary."""
    interval_ns = 60 * 10**9
    summary = IntervalSummary(start_ns, start_ns)
    fps = 5 + device_no % 20 + (i % 3)
    for k in range(int(fps) * 2):
        summary.observe((0.2 + 0.01 * (device_no % 7) + 0.001 * k) / 1000, k % 10, 0.9)
    temp = 45.0 + device_no % 30 + i
    summary.observe_temps({"cpu-thermal": temp, "gpu-thermal": temp - 5})
    attrs = summary.finish(
        start_ns + interval_ns,
        start_ns + interval_ns,
        {"cpu-thermal": temp, "gpu-thermal": temp - 5},
        "normal",
        30.0,
    )
    attrs["fps"] = float(fps)
    if device_no % 4 == 0:
        attrs["drift_psi"] = round(0.01 * (device_no % 13), 3)
    return attrs


@pytest.fixture(scope="module")
def real_gate_report() -> dict[str, Any]:
    from agent.ota.golden import run_gate

    models = ROOT / "agent" / "demo" / "models"
    report = run_gate(
        models / "digits_fp32.onnx", models / "digits_int8.onnx", ROOT / "golden_local"
    )
    return dict(report.to_dict())


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, real_gate_report: dict[str, Any]
) -> Iterator[Fleet]:
    """One fleet for the module: ingesting 200 devices' telemetry is the slow part."""
    tmp_path = tmp_path_factory.mktemp("fleet")
    operator_keys = make_key_dir(tmp_path / "keys")
    base = tmp_path / "repo"
    release = [k for k in operator_keys if k.role == "release"]
    init_repo(base, operator_keys, release_threshold=2)
    for version, counter in (("1.0.0", 1), ("1.1.0", 2)):
        publish_package(
            base,
            build_package(tmp_path / "p", release, version=version, release_counter=counter),
            operator_keys,
        )
    policy = RolloutPolicy(stages_percent=(1.0, 10.0, 100.0), soak_s=3600, min_devices=5)
    start_rollout(base, "stable", "1.1.0", operator_keys, policy, package="digits")
    salt = load_state(base, "stable").salt
    tokens_path = tmp_path / "tokens.json"
    devices = [f"cam-{n:03d}" for n in range(DEVICES)]
    device_tokens = {d: add_device_token(tokens_path, d) for d in devices}
    operator_token = add_operator_token(tokens_path, "alice")
    # The 10 % stage's members took 1.1.0; two of them refused it at the gate.
    on_new = [d for d in devices if is_member(d, salt, 10.0)]
    rejected = on_new[:2]
    store = SQLiteTelemetryStore(tmp_path / "fleet.db")
    config = ServerConfig(repo_dir=base, db_url=str(tmp_path / "fleet.db"), tokens_path=tokens_path)
    t0 = time.time_ns() - 3 * 3600 * 10**9
    with running_server(create_app(config, store)) as url:
        for n, device in enumerate(devices):
            rows = [ota_record(device, 1, "COMMITTED", "1.0.0", t0 + n, from_version="")]
            seq = 2
            if device in on_new:
                failed = device in rejected
                report = dict(real_gate_report)
                if failed:
                    report = {**report, "passed": False, "verdict": "FAIL"}
                rows.append(
                    _record(
                        device,
                        seq,
                        "event",
                        "ota.gate_report",
                        t0 + 3600 * 10**9 + n,
                        {"version": "1.1.0", "passed": not failed, "report": report},
                    )
                )
                state = "REJECTED" if failed else "COMMITTED"
                record = ota_record(device, seq + 1, state, "1.1.0", t0 + 3601 * 10**9 + n)
                if failed:
                    record = _with_reason(record, "gate failed: accuracy, class_recall")
                rows.append(record)
                seq += 2
            for i in range(SUMMARIES_PER_DEVICE):
                start = t0 + 2 * 3600 * 10**9 + i * 60 * 10**9 + n
                rows.append(
                    _record(
                        device, seq, "summary", "inference.summary", start, _summary(n, i, start)
                    )
                )
                seq += 1
            headers = {
                "Authorization": f"Bearer {device_tokens[device]}",
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
            }
            for path, payload in (
                ("/v1/logs", otlp.logs_request(rows)),
                ("/v1/metrics", otlp.metrics_request(rows)),
            ):
                body = gzip.compress(json.dumps(payload).encode())
                answer = requests.post(url + path, data=body, headers=headers, timeout=30)
                assert answer.status_code == 200, answer.text
        yield Fleet(
            url,
            base,
            operator_token,
            device_tokens,
            rejected,
            on_new,
            real_gate_report,
            "cpu-thermal",
        )
    store.close()


def _with_reason(rec: StoredRecord, reason: str) -> StoredRecord:
    return dataclasses.replace(rec, attrs={**rec.attrs, "reason": reason})


def test_fleet_page_with_200_devices(browser: Any, fleet: Fleet, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    log_in(browser, fleet.url, fleet.operator_token)
    assert browser.title == "edge-agent fleet"
    parts = require_parts(
        browser,
        {
            "rollout table": "#channel-stable table.summary",
            "versions table": "#channel-stable table.versions",
            "versions chart": "#channel-stable svg.versions-chart polyline",
            "device table": "table.devices tbody tr.device",
            "device filter": "form.filter",
        },
    )
    table = device_table(browser)
    assert len(table) == DEVICES
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "table.devices th")]
    for column in ("device", "version", "OTA state", "reason", "last seen", "FPS", "p95 ms"):
        assert any(h.startswith(column) for h in headers), headers
    bad = table[fleet.rejected[0]]
    assert bad["version"] == "1.0.0" and bad["ota_state"] == "REJECTED"
    assert "gate failed: accuracy" in bad["reason"]
    good = table[fleet.on_new[-1]]
    assert good["version"] == "1.1.0" and good["ota_state"] == "COMMITTED"
    for cell in ("fps", "p95", "temp", "last_seen"):
        missing = [d for d, row in table.items() if row[cell] in ("", "-", "never")]
        assert not missing, f"{cell} missing for {missing[:5]}"
    drift = [row["drift"] for row in table.values()]
    assert drift.count("-") == DEVICES - DEVICES // 4, "drift only where a device reports it"
    assert table["cam-004"]["drift"] == f"{0.01 * 4:.3f}"
    versions = {
        line.get_attribute("data-version")
        for line in parts["versions chart"].find_elements(By.XPATH, "../*[name()='polyline']")
    }
    assert versions == {"1.0.0", "1.1.0"}
    assert parts["versions chart"].rect["width"] > 100
    top = tmp_path / "fleet-overview-top.png"
    assert browser.save_screenshot(str(top)) and top.stat().st_size > 10_000
    if os.environ.get("EDGE_AGENT_UPDATE_SCREENSHOT") == "1":
        shutil.copy(top, DOCS_SCREENSHOT)
    screenshot(browser, tmp_path / "fleet-overview.png")

    # Filter by state, then sort by FPS, highest first (server-side query parameters).
    browser.get(fleet.url + "/?state=REJECTED")
    assert sorted(device_table(browser)) == sorted(fleet.rejected)
    browser.get(fleet.url + "/?q=cam-1&sort=fps&desc=1")
    shown = device_table(browser)
    assert len(shown) == 100 and all(d.startswith("cam-1") for d in shown)
    fps = [float(row["fps"]) for row in shown.values()]  # in page order
    assert fps == sorted(fps, reverse=True) and fps[0] > fps[-1]

    # Nothing from elsewhere, nothing that runs.
    entries = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(e.startswith(fleet.url) for e in entries), entries
    assert browser.find_elements(By.TAG_NAME, "script") == []


def test_device_page_shows_history_gate_report_and_charts(
    browser: Any, fleet: Fleet, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    device = fleet.rejected[0]
    log_in(browser, fleet.url, fleet.operator_token, f"/fleet/devices/{device}")
    parts = require_parts(
        browser,
        {
            "fps chart": "svg.chart-fps polyline",
            "latency chart": "svg.chart-latency polyline",
            "temperature chart": "svg.chart-temperature polyline",
            "gate report": "table.gate-checks tr.check",
            "OTA history": "table.ota-history tr.ota",
        },
    )
    for name in ("fps chart", "latency chart"):
        assert parts[name].get_attribute("data-points") == str(SUMMARIES_PER_DEVICE)
        assert parts[name].rect["width"] > 300, f"{name} should span the time axis"
    zones = {
        el.get_attribute("data-series")
        for el in browser.find_elements(By.CSS_SELECTOR, "svg.chart-temperature polyline")
    }
    assert zones == {"cpu-thermal", "gpu-thermal"}
    checks = browser.find_elements(By.CSS_SELECTOR, "table.gate-checks tr.check")
    expected = [c["name"] for c in fleet.gate_report["checks"]]
    assert [c.find_element(By.TAG_NAME, "td").text for c in checks] == expected
    for check, want in zip(checks, fleet.gate_report["checks"]):
        for cell in ("value", "threshold"):
            shown = check.find_element(By.CSS_SELECTOR, f"td.{cell}").text
            assert float(shown) == pytest.approx(want[cell], rel=1e-5, abs=1e-9), (cell, want)
    assert "FAIL" in browser.find_element(By.CSS_SELECTOR, "p.gate").text
    history = [
        r.find_element(By.CSS_SELECTOR, "td.ota-state").text
        for r in browser.find_elements(By.CSS_SELECTOR, "table.ota-history tr.ota")
    ]
    assert history == ["REJECTED", "COMMITTED"]  # newest first
    screenshot(browser, tmp_path / f"device-{device}.png")


def test_rollout_page_shows_stages_and_decision(browser: Any, fleet: Fleet, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    log_in(browser, fleet.url, fleet.operator_token, "/fleet/rollouts/stable")
    require_parts(
        browser,
        {
            "stages": "table.stages tr.stage",
            "decision": "table.decision td.action",
            "history": "table.history tr.action",
        },
    )
    salt = load_state(fleet.base, "stable").salt
    stages = browser.find_elements(By.CSS_SELECTOR, "table.stages tr.stage")
    assert len(stages) == 3
    devices = list(fleet.device_tokens)
    for stage, percent in zip(stages, (1.0, 10.0, 100.0)):
        members = [d for d in devices if is_member(d, salt, percent)]
        new = [d for d in members if d in fleet.on_new]
        rejected = [d for d in members if d in fleet.rejected]
        assert stage.find_element(By.CSS_SELECTOR, "td.members").text == str(len(members))
        assert stage.find_element(By.CSS_SELECTOR, "td.committed").text == str(
            len(new) - len(rejected)
        )
        assert stage.find_element(By.CSS_SELECTOR, "td.failed").text == str(len(rejected))
    assert stages[0].find_element(By.CSS_SELECTOR, "td.status").text == "current"
    assert "start" in browser.find_element(By.CSS_SELECTOR, "table.history").text
    screenshot(browser, tmp_path / "rollout-stable.png")


@dataclass(frozen=True)
class ReadAttempt:
    id: str
    credential: str  # what the caller holds
    status: int


READ_ATTEMPTS = [
    ReadAttempt("no-token", "none", 401),
    ReadAttempt("device-token", "device", 401),
    ReadAttempt("made-up-token", "made-up", 401),
    ReadAttempt("operator-token", "operator", 200),
]


@pytest.mark.parametrize("attempt", READ_ATTEMPTS, ids=lambda a: a.id)
@pytest.mark.parametrize("path", ["/api/rollouts", "/api/rollouts/stable", "/api/devices"])
def test_fleet_reads_need_an_operator_token(fleet: Fleet, attempt: ReadAttempt, path: str) -> None:
    token = {
        "none": None,
        "device": next(iter(fleet.device_tokens.values())),
        "made-up": "x" * 43,
        "operator": fleet.operator_token,
    }[attempt.credential]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = requests.get(fleet.url + path, headers=headers, timeout=30)
    assert answer.status_code == attempt.status
    assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
    page = requests.get(fleet.url + "/", headers=headers, timeout=30, allow_redirects=False)
    if attempt.status == 200:
        assert page.status_code == 200 and "table" in page.text
        assert "script-src" not in page.headers["Content-Security-Policy"]  # none allowed
        assert page.headers["Cache-Control"] == "no-store"
    else:
        assert page.status_code == 303 and page.headers["Location"].startswith("/login")


def test_status_page_shows_rollout_and_version_chart(
    browser: Any, tmp_path: Path, operator_keys: list[OperatorKey]
) -> None:
    from selenium.webdriver.common.by import By

    base = tmp_path / "repo"
    release = [k for k in operator_keys if k.role == "release"]
    init_repo(base, operator_keys, release_threshold=2)
    for version, counter in (("1.0.0", 1), ("1.1.0", 2)):
        publish_package(
            base,
            build_package(tmp_path / "p", release, version=version, release_counter=counter),
            operator_keys,
        )
    salt = "0123456789abcdef"
    start_rollout(
        base, "stable", "1.1.0", operator_keys, RolloutPolicy(), package="digits", salt=salt
    )
    store = SQLiteTelemetryStore(tmp_path / "fleet.db")
    # Ten devices on 1.0.0; later three canaries (members of the 1 % stage: only members'
    # reports count) move to 1.1.0 and one of them rolls back.
    canaries = [d for d in (f"canary-{i}" for i in range(5000)) if is_member(d, salt, 1.0)][:3]
    fleet = canaries + [f"d{i}" for i in range(7)]
    t0 = time.time_ns() - 3600 * 10**9
    rows = [
        ota_record(d, 1, "COMMITTED", "1.0.0", t0 + i, from_version="") for i, d in enumerate(fleet)
    ]
    rows += [
        ota_record(d, 2, "COMMITTED", "1.1.0", t0 + 1800 * 10**9 + i)
        for i, d in enumerate(canaries)
    ]
    rows += [ota_record(canaries[2], 3, "ROLLED_BACK", "1.1.0", t0 + 2400 * 10**9)]
    store.insert_logs(parse_otlp_logs(otlp.logs_request(rows)))
    tokens = tmp_path / "tokens.json"
    operator = add_operator_token(tokens, "alice")
    config = ServerConfig(repo_dir=base, db_url=str(tmp_path / "fleet.db"), tokens_path=tokens)
    with running_server(create_app(config, store)) as url:
        log_in(browser, url, operator)
        assert browser.title == "edge-agent fleet"
        section = browser.find_element(By.ID, "channel-stable")
        assert "digits 1.1.0" in section.find_element(By.TAG_NAME, "h2").text
        assert section.find_element(By.CSS_SELECTOR, "td.percent").text == "1%"
        assert section.find_element(By.CSS_SELECTOR, "td.committed").text == "2"
        assert section.find_element(By.CSS_SELECTOR, "td.failed").text == "1"
        chart = section.find_element(By.CSS_SELECTOR, "svg.versions-chart")
        lines = {
            el.get_attribute("data-version"): el
            for el in chart.find_elements(By.TAG_NAME, "polyline")
        }
        assert set(lines) == {"1.0.0", "1.1.0"}
        for line in lines.values():
            box = line.rect
            assert box["width"] > 100, "a line should span the time axis"
            assert line.value_of_css_property("stroke") not in ("none", "")
        legend = [el.text for el in chart.find_elements(By.CSS_SELECTOR, "text.legend")]
        assert "1.0.0: 8 devices now" in legend and "1.1.0: 2 devices now" in legend
        # The page loads nothing from elsewhere (no CDN, no scripts).
        entries = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert all(e.startswith(url) for e in entries), entries
        assert browser.find_elements(By.TAG_NAME, "script") == []
    store.close()


def test_chart_without_reports_says_so() -> None:
    svg = render_chart_svg([], {}, "digits versions")
    assert "no device reports yet" in svg and "<polyline" not in svg
