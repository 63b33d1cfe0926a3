"""The status web page in a real headless Chromium: rollout table and versions-over-time chart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_testlib import build_package, ota_record, running_server

from agent.fleet.keys import OperatorKey
from agent.fleet.repo import init_repo, publish_package
from agent.fleet.rollout import RolloutPolicy, is_member, start_rollout
from agent.fleet.server import ServerConfig, create_app
from agent.fleet.status import render_chart_svg
from agent.fleet.store import SQLiteTelemetryStore
from agent.telemetry import otlp

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


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
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


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
    from agent.fleet.store import parse_otlp_logs

    store.insert_logs(parse_otlp_logs(otlp.logs_request(rows)))
    config = ServerConfig(repo_dir=base, db_url=str(tmp_path / "fleet.db"))
    with running_server(create_app(config, store)) as url:
        browser.get(url + "/")
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
