"""Prints a wheel's requirements (one per line) for the chosen extras, minus excluded names."""

from __future__ import annotations

import argparse
import re
import sys
import zipfile


def wheel_requirements(wheel: str, extras: set[str], exclude: set[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        lines = whl.read(meta).decode("utf-8").splitlines()
    found: list[str] = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line.split(":", 1)[1].strip().partition(";")
        extra = re.search(r"extra == ['\"]([^'\"]+)", marker)
        if extra and extra.group(1) not in extras:
            continue
        name = re.split(r"[<>=!~ \[]", req.strip())[0].lower().replace("_", "-")
        if name not in exclude:
            # no spaces: the shell passes each requirement to pip as one word
            found.append(req.strip().replace(" ", ""))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("wheel")
    parser.add_argument("--extras", default="", help="comma-separated extras")
    parser.add_argument("--exclude", action="append", default=[], help="a name to leave out")
    args = parser.parse_args()
    extras = {e for e in args.extras.split(",") if e}
    exclude = {e.lower().replace("_", "-") for e in args.exclude}
    for req in wheel_requirements(args.wheel, extras, exclude):
        print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main())
