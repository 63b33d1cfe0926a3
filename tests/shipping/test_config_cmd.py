"""`edge-agent config init` and `config check` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.config import AgentConfig, load_config


def test_init_prints_a_commented_default_that_loads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "init"]) == 0
    text = capsys.readouterr().out
    assert "# sinks: where results go" in text and "fps_cap: 15.0  # frames per second" in text
    out = tmp_path / "agent.yaml"
    out.write_text(text)
    assert load_config(out) == AgentConfig()


def test_init_writes_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "etc" / "agent.yaml"
    assert main(["config", "init", "--out", str(out)]) == 0
    assert load_config(out) == AgentConfig()
    out.write_text("log_level: DEBUG\n")
    assert main(["config", "init", "--out", str(out)]) == 2
    assert "already exists (use --force" in capsys.readouterr().err
    assert out.read_text() == "log_level: DEBUG\n"
    assert main(["config", "init", "--out", str(out), "--force"]) == 0
    assert load_config(out) == AgentConfig()


def test_check_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("scheduler: {fps_cap: 5}\nota: {enabled: true}\n")
    assert main(["config", "check", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert "OK: model none (OTA package), backend auto, source synthetic, fps_cap 5" in captured.out
    assert "ota.repository_url is not set" in captured.err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {bakend: onnx}\n", "model.bakend: unknown key"),
        ("scheduler: {fps_cap: fast}\n", "scheduler.fps_cap: expected a number"),
        ("governor: {soft_limit_c: 90}\n", "hard_limit_c: must be above soft_limit_c"),
        ("model: [1\n", "invalid YAML"),
    ],
)
def test_check_names_the_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {cfg}") and message in err
    assert len(err.strip().splitlines()) == 1


def test_check_missing_file_and_bare_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(tmp_path / "none.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["config"]) == 2
    assert "choose a subcommand" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["doctor", "--help"], ["config", "init", "--help"], ["config", "check", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        assert "example:\n  edge-agent " in capsys.readouterr().out
