"""packaging/lib/wheel_requirements.py (the Jetson dependency filter) and the --jetson build."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import BUILD_SH, REPO, needs_dpkg, needs_system_python, run

FILTER = REPO / "packaging" / "lib" / "wheel_requirements.py"

# As setuptools writes them: old "(>=x)" spelling, environment markers, extras (quoted
# both ways), a combined marker, and a name spelled with other case and separators.
REQUIRES = [
    "numpy (>=1.24)",
    "onnxruntime>=1.17",
    "PyYAML>=6.0",
    "tomli>=2; python_version < '3.0'",
    'typing-extensions>=4; python_version >= "3"',
    'pywin32>=300; sys_platform == "win32"',
    'ai-edge-litert>=1.0; extra == "litert"',
    "tensorrt>=8.6; extra == 'tensorrt'",
    'onnxruntime-gpu>=1.17; extra == "tensorrt"',
    'atheris>=2.3; (platform_machine == "x86_64" or os_name != "x") and extra == "dev"',
    "OnnxRuntime_GPU>=1; extra == 'odd'",
    "cryptography[ssh]>=41",
]


def make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal valid pure-Python wheel (METADATA, WHEEL, RECORD with hashes)."""
    dist = f"{name}-{version}.dist-info"
    module = f"{name}_marker.py"
    meta = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        *(f"Requires-Dist: {r}" for r in requires),
    ]
    files = {
        module: b"MARK = True\n",
        f"{dist}/METADATA": ("\n".join(meta) + "\n").encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def requirements(wheel: Path, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(FILTER), str(wheel), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(tmp_path, "edge_agent", "0.1.0", REQUIRES)


def test_base_requirements_with_markers_evaluated(wheel: Path) -> None:
    # tomli (python < 3) and pywin32 (Windows) do not apply here, typing-extensions does
    assert requirements(wheel) == [
        "numpy>=1.24",
        "onnxruntime>=1.17",
        "PyYAML>=6.0",
        "typing-extensions>=4",
        "cryptography[ssh]>=41",
    ]


def test_jetson_filter_leaves_the_jetpack_runtimes_out(wheel: Path) -> None:
    jetson = ["--exclude", "onnxruntime", "--exclude", "onnxruntime-gpu", "--exclude", "tensorrt"]
    got = requirements(wheel, "--extras", "litert,tensorrt", *jetson)
    assert got == [
        "numpy>=1.24",
        "PyYAML>=6.0",
        "typing-extensions>=4",
        "ai-edge-litert>=1.0",
        "cryptography[ssh]>=41",
    ]
    # names compare as PEP 503 normalizes them: OnnxRuntime_GPU is onnxruntime-gpu
    assert "OnnxRuntime_GPU>=1" in requirements(wheel, "--extras", "odd")
    assert not any("GPU" in r for r in requirements(wheel, "--extras", "odd", *jetson))


def test_extras_select_only_their_own_lines(wheel: Path) -> None:
    assert "ai-edge-litert>=1.0" not in requirements(wheel)
    tensorrt = requirements(wheel, "--extras", "tensorrt")
    assert {"tensorrt>=8.6", "onnxruntime-gpu>=1.17"} <= set(tensorrt)
    assert "ai-edge-litert>=1.0" not in tensorrt
    assert "atheris>=2.3" in requirements(wheel, "--extras", "dev")


def test_the_projects_own_wheel(agent_wheel: Path) -> None:
    got = requirements(agent_wheel, "--extras", "litert", "--exclude", "onnxruntime")
    names = {r.split(">")[0].split("=")[0].split("<")[0].lower() for r in got}
    assert {"numpy", "pyyaml", "cryptography", "tuf", "ai-edge-litert"} <= names
    assert "onnxruntime" not in names
    assert not names & {"pytest", "atheris", "fastapi", "tflite-runtime"}  # other extras


def test_not_a_wheel(tmp_path: Path) -> None:
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    done = subprocess.run(
        [sys.executable, str(FILTER), str(bad)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert done.stderr.startswith("Error: ") and len(done.stderr.strip().splitlines()) == 1


def pyvenv_cfg(deb: Path, root: Path) -> dict[str, str]:
    assert run(["dpkg", "-x", str(deb), str(root)]).returncode == 0
    cfg = (root / "opt/edge-agent/venv/pyvenv.cfg").read_text()
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in cfg.splitlines())}


@needs_dpkg
@needs_system_python
def test_jetson_build_uses_system_site_packages_and_the_filter(
    tmp_path: Path, deb_tree: Path
) -> None:
    """--jetson: the venv sees JetPack's packages; onnxruntime/tensorrt are never pip-installed.

    Offline against a wheelhouse that holds only `tinydep`: had the filter passed
    onnxruntime, tensorrt or a Windows-only requirement to pip, the build would fail.
    """
    agent = make_wheel(
        tmp_path / "in",
        "edge_agent",
        "0.1.0",
        [
            "tinydep>=1.0",
            "onnxruntime>=1.17",
            'pywin32>=300; sys_platform == "win32"',
            "tensorrt>=8.6; extra == 'tensorrt'",
        ],
    )
    wheelhouse = tmp_path / "wheelhouse"
    make_wheel(wheelhouse, "tinydep", "1.2.0", [])
    out = tmp_path / "out"
    argv = ["sh", str(BUILD_SH), "--jetson", "--wheel", str(agent), "--wheelhouse",
            str(wheelhouse), "--extras", "tensorrt", "--out", str(out)]  # fmt: skip
    done = run(argv, env_extra={"PIP_NO_CACHE_DIR": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    deb = Path(done.stdout.strip().splitlines()[-1])
    root = tmp_path / "root"
    assert pyvenv_cfg(deb, root)["include-system-site-packages"] == "true"
    site = next((root / "opt/edge-agent/venv/lib").glob("python3*/site-packages"))
    assert (site / "tinydep_marker.py").is_file() and (site / "edge_agent_marker.py").is_file()
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert installed >= {"tinydep", "edge_agent"}
    assert not installed & {"onnxruntime", "tensorrt", "pywin32"}
    fields = run(["dpkg-deb", "-f", str(deb), "Description"]).stdout
    assert "Jetson" in fields
    # the generic build (the session's fast .deb) keeps the system's packages out
    generic = (deb_tree / "opt/edge-agent/venv/pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in generic


@needs_dpkg
@needs_system_python
def test_jetson_no_deps_build_of_the_agent(tmp_path: Path, agent_wheel: Path) -> None:
    """The real agent wheel, --jetson --no-deps (JetPack provides everything): it imports."""
    done = run(["sh", str(BUILD_SH), "--jetson", "--no-deps", "--wheel", str(agent_wheel),
                "--out", str(tmp_path)], env_extra={"EDGE_AGENT_JETSON": "0"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "root"
    assert pyvenv_cfg(Path(done.stdout.split()[-1]), root)["include-system-site-packages"] == "true"
    python = root / "opt/edge-agent/venv/bin/python"
    probe = run(
        [str(python), "-c", "import agent, sys; print(agent.__file__, sys.prefix)"], cwd=tmp_path
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith(str(root / "opt/edge-agent/venv/lib/"))
    assert os.readlink(python).startswith("/usr/bin/python3") or os.readlink(python) == "python3"
