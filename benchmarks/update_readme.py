"""Regenerates the README's results tables from ``benchmarks/results/*.md`` (written by the benchmarks).

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers in
README.md (and in ``docs/snippets/benchmark_summary.md`` if present), where ``NAME`` is the stem
of a file in ``benchmarks/results/``. Run from anywhere::

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = [ROOT / "README.md", ROOT / "docs" / "snippets" / "benchmark_summary.md"]
MARKER = re.compile(r"(<!-- results:([\w.+-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def fill(text: str) -> tuple[str, list[str]]:
    """Replaces every marked block with the current results file; returns the text and the names."""
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        path = RESULTS / f"{m.group(2)}.md"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run the benchmark that writes it first.")
        names.append(m.group(2))
        return m.group(1) + path.read_text().strip() + "\n" + m.group(4)

    return MARKER.sub(sub, text), names


def main() -> int:
    for target in TARGETS:
        if not target.exists():
            continue
        new, names = fill(target.read_text())
        target.write_text(new)
        print(f"{target.relative_to(ROOT)}: {', '.join(names) or 'no markers'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
