"""Counts code lines (not blank, comment or docstring lines), files and the functions' lengths.

python -m benchmarks.code_lines benchmarks
python -m benchmarks.code_lines torch_tempopt --exclude torch_tempopt/contrib torch_tempopt/patches
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import statistics
import sys
import tokenize
from pathlib import Path
from typing import Any

__all__ = ["code_lines", "functions", "main", "measure"]


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str) -> set[int]:
    """The line numbers that hold code: a token other than a comment, outside docstrings."""
    docs = _docstring_lines(ast.parse(source))
    lines: set[int] = set()
    skip = {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENDMARKER,
    }
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    return lines


def functions(source: str, path: str) -> list[tuple[str, int]]:
    """Every function's qualified name and its code lines."""
    tree, code = ast.parse(source), code_lines(source)
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = len([i for i in range(child.lineno, child.end_lineno + 1) if i in code])
                out.append((f"{path}:{prefix}{child.name}", n))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def _top_level_names(source: str) -> int:
    """Functions, classes and assigned names at a module's top level."""
    names = 0
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names += 1
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += sum(isinstance(t, ast.Name) for t in targets)
    return names


def measure(roots: list[str], exclude: list[str]) -> dict[str, Any]:
    """Code lines per file and in all, the five longest functions, and the functions' lengths."""
    found = (p for r in roots for p in (Path(r).rglob("*.py") if Path(r).is_dir() else [Path(r)]))
    files = sorted(p for p in found if not any(p.is_relative_to(e) for e in map(Path, exclude)))
    per_file, funcs, names = {}, [], 0
    for p in files:
        src = p.read_text()
        per_file[str(p)] = len(code_lines(src))
        funcs += functions(src, str(p))
        names += _top_level_names(src)
    lengths = sorted(n for _, n in funcs) or [0]
    top = {p.parent for p in map(Path, roots) if p.is_file()} | {
        Path(r) for r in roots if Path(r).is_dir()
    }
    return {
        "code_lines": sum(per_file.values()),
        "files": per_file,
        "top_level_files": sum(Path(f).parent in top for f in per_file),
        "top_level_names": names,
        "longest_functions": sorted(funcs, key=lambda f: -f[1])[:5],
        "functions": len(funcs),
        "median_function": statistics.median(lengths),
        "p90_function": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("paths", nargs="+")
    p.add_argument("--exclude", nargs="*", default=[])
    args = p.parse_args(argv)
    json.dump(measure(args.paths, args.exclude), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
