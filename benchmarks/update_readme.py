"""Refills the results tables of README.md and the docs pages from ``benchmarks/results/*.md``.

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers, where
``NAME`` is the stem of a file in ``benchmarks/results/`` written by a benchmark::

    python -m benchmarks.update_readme           # rewrites the pages
    python -m benchmarks.update_readme --check   # exits 1 if a page's table differs from its file
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from benchmarks.writer import RESULTS, ROOT

__all__ = ["fill", "main", "pages"]

MARKER = re.compile(r"(<!-- results:([\w.+-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def pages() -> list[Path]:
    """README.md and every markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fill(text: str) -> tuple[str, list[str]]:
    """Replaces every marked block with its results file; returns the text and the names."""
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        path = RESULTS / f"{m.group(2)}.md"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run the benchmark that writes it first.")
        names.append(m.group(2))
        return m.group(1) + path.read_text().strip() + "\n" + m.group(4)

    return MARKER.sub(sub, text), names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a table is stale"
    )
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new, names = fill(text)
        if new != text:
            stale.append(str(page.relative_to(ROOT)))
        if names and not args.check:
            page.write_text(new)
            print(f"{page.relative_to(ROOT)}: {', '.join(names)}")
    if args.check and stale:
        print(
            f"stale results tables in {', '.join(stale)}: run python -m benchmarks.update_readme"
        )
    return int(args.check and bool(stale))


if __name__ == "__main__":
    sys.exit(main())
