"""The rollout's state word and stage label: one wording, the same on the fleet page and the CLI."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent.cli import main
from agent.fleet.label import rollout_state_word, stage_label
from agent.fleet.page import _rollout_section


@dataclass(frozen=True)
class Row:
    id: str
    aborted: bool
    completed: bool
    paused: bool
    stage: int  # index into stages_percent, as the rollout state stores it
    stages_percent: tuple[float, ...]
    word: str
    label: str


ROWS = [
    Row("running-first", False, False, False, 0, (1.0, 10.0, 100.0), "running", "1/3"),
    Row("paused-second", False, False, True, 1, (1.0, 10.0, 100.0), "paused", "2/3"),
    Row("complete-last", False, True, False, 2, (1.0, 10.0, 100.0), "complete", "3/3"),
    # aborted wins over paused and completed: an aborted release is what an operator must see
    Row("aborted-and-paused", True, True, True, 0, (1.0, 100.0), "aborted", "1/2"),
    Row("single-stage", False, False, False, 0, (100.0,), "running", "1/1"),
]


def _status(row: Row) -> dict[str, Any]:
    return {
        "channel": "stable",
        "package": "digits",
        "version": "1.1.0",
        "aborted": row.aborted,
        "completed": row.completed,
        "paused": row.paused,
        "stage": row.stage,
        "stages_percent": list(row.stages_percent),
        "percent": row.stages_percent[row.stage],
        "members_known": 2,
        "committed": 1,
        "failed": 0,
        "failure_rate": 0.0,
        "max_failure_rate": 0.05,
        "next_decision": "wait",
        "next_reason": "stage is soaking",
        "soak_left_s": 10.0,
        "quality": [],
        "quality_abort": None,
        "devices_by_version_state": [],
    }


@contextmanager
def _status_server(st: dict[str, Any]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering /api/rollouts/stable with ``st``."""
    body = json.dumps(st).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/api/rollouts/stable"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body if ok else b"{}")

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_label_reads_the_same_everywhere(row: Row, capsys: pytest.CaptureFixture[str]) -> None:
    st = _status(row)
    assert rollout_state_word(st) == row.word
    assert stage_label(st["stage"], len(st["stages_percent"])) == row.label

    html = _rollout_section(st, "")
    assert f'<td class="state">{row.word}</td><td>{row.label}</td>' in html

    # The CLI's `rollout status --server` against a server that sends this status.
    with _status_server(st) as url:
        argv = ["rollout", "status", "--channel", "stable", "--server", url]
        assert main([*argv, "--operator-token", "op-token"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"channel stable: digits 1.1.0 ({row.word})"
    assert any(line.split()[:1] == [row.label] for line in lines), lines
