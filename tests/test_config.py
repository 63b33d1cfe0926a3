"""The YAML config loader: every wrong key named as file:key.path with what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, from_mapping, load_config, to_plain
from agent.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_defaults_load_from_empty_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    assert cfg == AgentConfig()
    assert cfg.scheduler.fps_cap == 15.0


def test_values_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            "state_dir: state\nmodel:\n  path: m.onnx\n  intra_op_threads: 2\n"
            "sinks:\n  - kind: jsonl\n    path: out/results.jsonl\n"
            "telemetry:\n  headers: {Authorization: Bearer x}\n",
        )
    )
    assert cfg.state_dir == tmp_path.resolve() / "state"
    assert cfg.model.path == tmp_path.resolve() / "m.onnx"
    assert cfg.sinks[0].path == tmp_path.resolve() / "out" / "results.jsonl"
    assert cfg.telemetry.headers["Authorization"] == "Bearer x"
    assert to_plain(cfg)["model"]["intra_op_threads"] == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modle: {}\n", ":modle: unknown key (known keys: "),
        ("model:\n  threads: 2\n", ":model.threads: unknown key"),
        (
            "model:\n  intra_op_threads: two\n",
            ":model.intra_op_threads: expected an integer, got string 'two'",
        ),
        (
            "scheduler:\n  fps_cap: true\n",
            ":scheduler.fps_cap: expected a number, got boolean true",
        ),
        (
            "model:\n  backend: cuda\n",
            ":model.backend: expected 'auto' or 'onnx' or 'litert' or 'tensorrt', "
            "got string 'cuda'",
        ),
        (
            "sinks:\n  - kind: stdout\n  - kind: carrier-pigeon\n",
            ":sinks[1].kind: expected 'jsonl' or",
        ),
        ("sinks: {kind: stdout}\n", ":sinks: expected a list of a mapping, got a mapping"),
        ("model: 3\n", ":model: expected a mapping, got number 3"),
        ("governor:\n  soft_limit_c: 90\n", ":governor: hard_limit_c: must be above soft_limit_c"),
        ("- a\n- b\n", ": expected a mapping at the top level, got a list"),
        ("model: [unclosed\n", ":2: invalid YAML"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_missing_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    big = _write(tmp_path, "# " + "x" * (2 << 20))
    with pytest.raises(ConfigError, match="more than"):
        load_config(big)


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    path = _write(tmp_path, "device_id: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_configs_are_frozen() -> None:
    cfg = from_mapping(AgentConfig, {"device_id": "pi-1"})
    with pytest.raises(AttributeError):
        cfg.device_id = "other"  # type: ignore[misc]
