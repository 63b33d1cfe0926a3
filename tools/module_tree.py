"""Print the agent/ module tree, one line per module, or check the copy kept in a doc.

docs/ARCHITECTURE.md keeps the tree between two markers; `--check` fails when a module was
added, removed or re-described without the page following, and `--write` rewrites the block.

    python tools/module_tree.py                                # print the tree
    python tools/module_tree.py --check docs/ARCHITECTURE.md   # exit 1 when the page is stale
    python tools/module_tree.py --write docs/ARCHITECTURE.md   # rewrite the page's block
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- module-tree: begin (python tools/module_tree.py --write docs/ARCHITECTURE.md) -->"
END = "<!-- module-tree: end -->"


def summary(path: Path) -> str:
    """The first line of a module's docstring ('' when it has none)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    return doc.strip().splitlines()[0] if doc else ""


def tree_lines(root: Path) -> list[str]:
    """`agent/` as an indented tree: packages first line from __init__.py, then modules."""
    lines: list[str] = []

    def walk(folder: Path, depth: int) -> None:
        pad = "  " * depth
        init = folder / "__init__.py"
        note = summary(init) if init.exists() else ""
        lines.append(f"{pad}{folder.name}/" + (f"  {note}" if note else ""))
        for module in sorted(folder.glob("*.py")):
            if module.name != "__init__.py":
                lines.append(f"{pad}  {module.name:<22} {summary(module)}".rstrip())
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if (sub / "__init__.py").exists():
                walk(sub, depth + 1)

    walk(root, 0)
    return lines


def block(root: Path) -> str:
    return "\n".join([BEGIN, "```", *tree_lines(root), "```", END])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[4:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", type=Path, metavar="DOC", help="fail when DOC's block is stale")
    group.add_argument("--write", type=Path, metavar="DOC", help="rewrite DOC's block")
    args = parser.parse_args()
    want = block(REPO_ROOT / "agent")
    doc_path = args.check or args.write
    if doc_path is None:
        print(want)
        return 0
    text = doc_path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        print(f"Error: no module-tree markers in {doc_path} (add {BEGIN!r} ... {END!r})")
        return 2
    have = text[start : end + len(END)]
    if args.check:
        if have != want:
            print(f"Error: the module tree in {doc_path} is stale: run {BEGIN[18:-4]}")
            return 1
        return 0
    doc_path.write_text(text[:start] + want + text[end + len(END) :], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
