"""Print the agent/ module tree and the OTA flow table, or check the copies kept in a doc.

docs/ARCHITECTURE.md keeps each between two markers: the tree (one line per module, its
docstring's first line) and the OTA flow table (agent/ota/states.py FLOW: state, event,
next state). `--check` fails when a module was added, removed or re-described, or a flow
row changed, without the page following; `--write` rewrites both blocks.

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
WRITE = "(python tools/module_tree.py --write docs/ARCHITECTURE.md)"
BEGIN = f"<!-- module-tree: begin {WRITE} -->"
END = "<!-- module-tree: end -->"
FLOW_BEGIN = f"<!-- ota-flow: begin {WRITE} -->"
FLOW_END = "<!-- ota-flow: end -->"


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


def flow_block() -> str:
    """agent/ota/states.py FLOW as a markdown table, in the table's own order."""
    sys.path.insert(0, str(REPO_ROOT))
    from agent.ota.states import FLOW

    rows = [f"| {s.value} | `{e.value}` | {n.value} |" for (s, e), n in FLOW.items()]
    return "\n".join(
        [FLOW_BEGIN, "| state | event | next state |", "|---|---|---|", *rows, FLOW_END]
    )


def replace_block(text: str, begin: str, end: str, want: str, where: Path) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"Error: no {begin!r} ... {end!r} markers in {where}")
    return text[:start] + want + text[stop + len(end) :]


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
    tree, flow = block(REPO_ROOT / "agent"), flow_block()
    doc_path = args.check or args.write
    if doc_path is None:
        print(tree + "\n\n" + flow)
        return 0
    text = doc_path.read_text(encoding="utf-8")
    want = replace_block(text, BEGIN, END, tree, doc_path)
    want = replace_block(want, FLOW_BEGIN, FLOW_END, flow, doc_path)
    if args.check:
        if want != text:
            print(f"Error: the module tree or OTA flow in {doc_path} is stale: run {WRITE[1:-1]}")
            return 1
        return 0
    doc_path.write_text(want, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
