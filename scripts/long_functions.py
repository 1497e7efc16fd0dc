"""List the functions in a source tree longer than a threshold (default 80 lines), longest first.

Usage: python scripts/long_functions.py [ROOT=src] [--min-lines N]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def long_functions(root: Path, min_lines: int) -> list[tuple[int, str]]:
    """Return `(lines, "path:line name")` for every function or method of at least `min_lines` lines."""
    found: list[tuple[int, str]] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines >= min_lines:
                    found.append((lines, f"{path}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main() -> None:
    """Print the long functions under ROOT, one a line, then their count."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", nargs="?", default="src", type=Path)
    parser.add_argument("--min-lines", type=int, default=81)
    args = parser.parse_args()
    rows = long_functions(args.root, args.min_lines)
    for lines, where in rows:
        print(f"{lines:5d}  {where}")
    print(f"{len(rows)} functions of {args.min_lines}+ lines under {args.root}")


if __name__ == "__main__":
    main()
