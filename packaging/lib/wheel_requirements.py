"""Prints a wheel's requirements (one per line) for the chosen extras, minus excluded names."""

from __future__ import annotations

import argparse
import re
import sys
import zipfile

try:
    from packaging.markers import Marker
except ImportError:  # a bare venv has no `packaging`, but its pip vendors one
    # the same class, vendored by pip: mypy sees two types
    from pip._vendor.packaging.markers import Marker  # type: ignore[assignment]


def normalize_name(name: str) -> str:
    """PEP 503: ONNX_Runtime, onnx.runtime and onnx-runtime are the same project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements(wheel: str, extras: set[str], exclude: set[str]) -> list[str]:
    """Requirements this interpreter would install for `wheel[extras]`, markers evaluated.

    Runs under the target venv's python, so `python_version` and `platform_machine`
    markers are judged for the target, as pip would; the printed requirements carry no
    marker (the shell passes each one to pip as a single word).
    """
    with zipfile.ZipFile(wheel) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        lines = whl.read(meta).decode("utf-8").splitlines()
    wanted_extras = {normalize_name(e) for e in extras}
    skip = {normalize_name(e) for e in exclude}
    found: list[str] = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker_text = line.split(":", 1)[1].strip().partition(";")
        if marker_text.strip():
            marker = Marker(marker_text.strip())
            # "" stands for the wheel without extras: a plain environment marker
            if not any(marker.evaluate({"extra": e}) for e in {"", *wanted_extras}):
                continue
        req = req.strip()
        name = re.split(r"[<>=!~ \[(@]", req, maxsplit=1)[0]
        if normalize_name(name) in skip:
            continue
        # "numpy (>=1.24)" is the old METADATA spelling of "numpy>=1.24"
        found.append(re.sub(r"[\s()]", "", req))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("wheel")
    parser.add_argument("--extras", default="", help="comma-separated extras")
    parser.add_argument("--exclude", action="append", default=[], help="a name to leave out")
    args = parser.parse_args()
    extras = {e for e in args.extras.split(",") if e}
    try:
        requirements = wheel_requirements(args.wheel, extras, set(args.exclude))
    except (OSError, zipfile.BadZipFile, StopIteration) as exc:
        reason = exc or "no METADATA"
        print(f"Error: {args.wheel}: not a readable wheel ({reason})", file=sys.stderr)
        return 2
    for req in requirements:
        print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main())
