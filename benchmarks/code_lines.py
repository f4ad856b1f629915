"""Counts code lines (non-blank lines that are not comments or docstrings) and the longest functions.

    python benchmarks/code_lines.py torch_tempopt --exclude torch_tempopt/contrib torch_tempopt/patches
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from pathlib import Path


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def code_lines(source: str) -> set[int]:
    """The line numbers that hold code: a token other than a comment, outside docstrings."""
    docs = _docstring_lines(ast.parse(source))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
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


def measure(roots: list[str], exclude: list[str]) -> dict:
    files = sorted(p for r in roots for p in (Path(r).rglob("*.py") if Path(r).is_dir() else [Path(r)])
                   if not any(p.is_relative_to(e) for e in map(Path, exclude)))
    per_file, funcs = {}, []
    for p in files:
        src = p.read_text()
        per_file[str(p)] = len(code_lines(src))
        funcs += functions(src, str(p))
    longest = sorted(funcs, key=lambda f: -f[1])[:5]
    return {"code_lines": sum(per_file.values()), "files": per_file, "longest_functions": longest}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+")
    p.add_argument("--exclude", nargs="*", default=[])
    args = p.parse_args(argv)
    json.dump(measure(args.paths, args.exclude), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
