"""The fleet page without a browser: filter/sort, charts, operator tokens, login, redirects."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from fleet_testlib import running_server

from agent.errors import UsageError
from agent.fleet.charts import time_series_svg
from agent.fleet.page import DeviceFilter, DeviceRow, filter_and_sort, running_version
from agent.fleet.server import ServerConfig, create_app
from agent.fleet.store_sqlite import SQLiteTelemetryStore
from agent.fleet.tokens import (
    add_device_token,
    add_operator_token,
    load_operator_tokens,
    load_tokens,
    revoke_device_token,
    revoke_operator_token,
)
from agent.fleet.web import COOKIE

CLI = [sys.executable, "-m", "agent.cli"]


def _row(device: str, version: str | None, state: str | None, fps: float | None) -> DeviceRow:
    return DeviceRow(device, version, state, None, 1.0, fps, None, None, None)


ROWS = [
    _row("pi-01", "1.1.0", "COMMITTED", 20.0),
    _row("pi-02", "1.0.0", "REJECTED", 5.0),
    _row("cam-01", "1.1.0", "COMMITTED", None),
    _row("cam-02", None, None, 12.5),
]


@dataclass(frozen=True)
class FilterCase:
    id: str
    query: dict[str, str]
    expected: list[str]


FILTER_CASES = [
    FilterCase("default-sorts-by-id", {}, ["cam-01", "cam-02", "pi-01", "pi-02"]),
    FilterCase("id-substring", {"q": "PI-"}, ["pi-01", "pi-02"]),
    FilterCase("by-version", {"version": "1.1.0"}, ["cam-01", "pi-01"]),
    FilterCase("by-state", {"state": "REJECTED"}, ["pi-02"]),
    FilterCase(
        "fps-ascending-missing-last", {"sort": "fps"}, ["pi-02", "cam-02", "pi-01", "cam-01"]
    ),
    FilterCase(
        "fps-descending-missing-last",
        {"sort": "fps", "desc": "1"},
        ["pi-01", "cam-02", "pi-02", "cam-01"],
    ),
    FilterCase(
        "unknown-sort-key-ignored", {"sort": "__class__"}, ["cam-01", "cam-02", "pi-01", "pi-02"]
    ),
    FilterCase("no-match", {"q": "nope"}, []),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: c.id)
def test_device_filter_and_sort(case: FilterCase) -> None:
    rows = filter_and_sort(ROWS, DeviceFilter.from_query(case.query))
    assert [r.device_id for r in rows] == case.expected


def test_running_version_follows_commits_and_rollbacks() -> None:
    def ev(state: str, version: str, from_version: str = "") -> dict[str, str]:
        return {"state": state, "version": version, "from_version": from_version}

    assert running_version([]) is None
    assert running_version([ev("COMMITTED", "1.0.0"), ev("DOWNLOADING", "1.1.0")]) == "1.0.0"
    assert running_version([ev("COMMITTED", "1.1.0"), ev("ROLLED_BACK", "1.1.0", "1.0.0")]) == (
        "1.0.0"
    )
    assert running_version([ev("COMMITTED", "1.0.0"), ev("REJECTED", "1.1.0", "1.0.0")]) == "1.0.0"


def test_time_series_chart_draws_every_point_and_says_when_empty() -> None:
    svg = time_series_svg(
        {"cpu": [(1, 40.0), (2, 41.0), (3, 39.5)], "gpu": [(2, 35.0)]},
        title="temperature",
        unit="°C",
        css_class="chart-temperature",
    )
    assert 'data-series="cpu" data-points="3"' in svg and "<polyline" in svg
    assert 'data-series="gpu" data-points="1"' in svg and "<circle" in svg  # one point: a dot
    assert "cpu: 39.5 °C now" in svg
    empty = time_series_svg({}, title="FPS", unit="frames/s", css_class="chart-fps")
    assert "no data reported yet" in empty and "<polyline" not in empty and "empty" in empty
    hostile = time_series_svg({"<script>": [(1, 1.0)]}, title="x", unit="u", css_class="c")
    assert "<script>" not in hostile and "&lt;script&gt;" in hostile


def test_operator_and_device_tokens_live_apart_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    device = add_device_token(path, "pi-1")
    operator = add_operator_token(path, "alice")
    add_device_token(path, "pi-2")  # rewriting the devices keeps the operators
    assert set(load_tokens(path).values()) == {"pi-1", "pi-2"}
    assert set(load_operator_tokens(path).values()) == {"alice"}
    doc = json.loads(path.read_text())
    assert operator not in path.read_text() and device not in path.read_text()  # sha256 only
    assert set(doc) == {"devices", "operators"}
    assert path.stat().st_mode & 0o777 == 0o600
    revoke_device_token(path, "pi-1")
    assert set(load_operator_tokens(path).values()) == {"alice"}
    revoke_operator_token(path, "alice")
    assert load_operator_tokens(path) == {}
    with pytest.raises(UsageError, match="has no token"):
        revoke_operator_token(path, "alice")


@dataclass(frozen=True)
class Redirect:
    id: str
    next_path: str  # what a link to the login form (attacker-chosen) carries
    lands_on: str


REDIRECTS = [
    Redirect("local-page", "/fleet/devices/pi-1", "/fleet/devices/pi-1"),
    Redirect("other-site", "https://evil.example/", "/"),
    Redirect("scheme-relative", "//evil.example/x", "/"),
    Redirect("backslash-trick", "/\\evil.example", "/"),
    Redirect("relative", "devices", "/"),
]


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    (tmp_path / "repo").mkdir()
    tokens = tmp_path / "tokens.json"
    device = add_device_token(tokens, "pi-1")
    operator = add_operator_token(tokens, "alice")
    store = SQLiteTelemetryStore(tmp_path / "fleet.db")
    config = ServerConfig(tmp_path / "repo", str(tmp_path / "fleet.db"), tokens_path=tokens)
    with running_server(create_app(config, store)) as url:
        yield url, operator, device
    store.close()


@pytest.mark.parametrize("case", REDIRECTS, ids=lambda c: c.id)
def test_login_sets_a_strict_cookie_and_redirects_only_on_site(
    served: tuple[str, str, str], case: Redirect
) -> None:
    url, operator, _ = served
    answer = requests.post(
        url + "/login",
        data={"token": operator, "next": case.next_path},
        allow_redirects=False,
        timeout=30,
    )
    assert answer.status_code == 303
    assert answer.headers["Location"] == case.lands_on
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie


@pytest.mark.parametrize(
    "credential,status", [("device", 401), ("wrong", 401), ("", 401), ("operator", 303)]
)
def test_login_takes_only_operator_tokens(
    served: tuple[str, str, str], credential: str, status: int
) -> None:
    url, operator, device = served
    token = {"device": device, "wrong": "x" * 43, "": "", "operator": operator}[credential]
    answer = requests.post(url + "/login", data={"token": token}, allow_redirects=False, timeout=30)
    assert answer.status_code == status
    if status == 401:
        assert "Set-Cookie" not in answer.headers and "unknown operator token" in answer.text
        # and the cookie route is closed too: a device token as the cookie reads nothing
        page = requests.get(url + "/", cookies={COOKIE: token}, allow_redirects=False, timeout=30)
        assert page.status_code == 303
    else:
        cookie = answer.cookies[COOKIE]
        page = requests.get(url + "/", cookies={COOKIE: cookie}, timeout=30)
        assert page.status_code == 200 and "Devices" in page.text
        assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert requests.get(url + "/static/fleet.css", timeout=30).status_code == 200


def test_token_cli_adds_and_revokes_operator_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "token", *args, "--tokens", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    added = cli("add", "--operator", "alice")
    assert added.returncode == 0, added.stderr
    assert set(load_operator_tokens(path).values()) == {"alice"}
    assert len(added.stdout.strip()) >= 40 and "fleet page" in added.stderr
    both = cli("add", "--operator", "bob", "--device", "pi-1")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    neither = cli("add")
    assert neither.returncode == 2 and "one of the arguments" in neither.stderr
    revoked = cli("revoke", "--operator", "alice")
    assert revoked.returncode == 0 and "operator token of alice revoked" in revoked.stdout
    again = cli("revoke", "--operator", "alice")
    assert again.returncode == 2 and again.stderr.startswith("Error: operator 'alice'")
