"""Lean start: each command imports only what it needs (a 512 MB board pays for every module)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.cli import COMMAND_MODULES, COMMANDS

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "agent" / "demo" / "models" / "digits_fp32.onnx"
# what a device-side command must not pay for unless it uses it
HEAVY = (
    "numpy",
    "onnxruntime",
    "yaml",
    "requests",
    "urllib3",
    "cryptography",
    "tuf",
    "securesystemslib",
    "onnx",
    "ai_edge_litert",
    "tflite_runtime",
    "http.server",
)


def test_command_table_matches_the_modules() -> None:
    """cli.COMMANDS (used to import one module per command) names every command right."""
    found: dict[str, str] = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).add_commands(sub)
        for command in sub.choices:
            found[command] = name
    assert found == COMMANDS


def loaded_heavy(code: str, *args: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the HEAVY modules it left loaded."""
    script = (
        f"import sys\n{code}\n"
        "import json\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted({m for m in sys.modules for h in heavy "
        "if m == h or m.startswith(h + '.')})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return sorted({m.split(".")[0] if m != "http.server" else m for m in loaded})


@dataclass(frozen=True)
class LeanCase:
    """A command, and the heavy modules it may load (everything else in HEAVY it must not)."""

    name: str
    argv: tuple[str, ...]
    allowed: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def left_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir as a stopped daemon leaves it: status.json (and no OTA journal)."""
    state = tmp_path_factory.mktemp("state")
    status = {"pid": 1, "state": "stopped", "updated": time.time(), "fps": 5.0}
    (state / "status.json").write_text(json.dumps(status))
    return state


@pytest.mark.parametrize(
    "case",
    [
        LeanCase("--version", ("--version",)),
        LeanCase("status on a state dir", ("status", "--state-dir", "{state}")),
        LeanCase("status --json", ("status", "--json", "--state-dir", "{state}")),
        LeanCase("a command's --help", ("rollback", "--help")),
    ],
    ids=lambda c: c.name,
)
def test_cli_command_imports_only_what_it_needs(case: LeanCase, left_state_dir: Path) -> None:
    argv = [a.replace("{state}", str(left_state_dir)) for a in case.argv]
    code = f"from agent.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    assert loaded_heavy(code) == sorted(case.allowed)


def test_daemon_with_ota_and_upload_off_loads_no_update_stack(tmp_path: Path) -> None:
    """An ONNX model, no OTA, no upload: no TUF, requests, cryptography or LiteRT."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "st"),
                "model": {"path": str(DIGITS), "warmup_runs": 1},
                "preprocess": {"resize": [8, 8], "layout": "NCHW", "color_order": "GRAY"},
                "source": {"kind": "synthetic", "pattern": "digits"},
                "scheduler": {"fps_cap": 20},
                "sinks": [],
                "telemetry": {"enabled": False},
            }
        )
    )
    code = (
        "import os, signal, threading\n"
        "from pathlib import Path\n"
        f"threading.Timer(3.0, lambda: os.kill(os.getpid(), {int(signal.SIGTERM)})).start()\n"
        "from agent.daemon import run_daemon\n"
        "assert run_daemon(Path(sys.argv[1])) == 0\n"
    )
    # numpy and onnxruntime run the model; yaml reads the config
    assert loaded_heavy(code, str(config)) == ["numpy", "onnxruntime", "yaml"]
