"""The one results writer: ``NAME.json`` and ``NAME.md``, each naming its command and machine."""

from __future__ import annotations

import json
import platform
import shlex
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "FIGURES",
    "RESULTS",
    "ROOT",
    "command",
    "describe",
    "machine",
    "write",
    "write_markdown",
]

ROOT = Path(__file__).resolve().parents[1]
#: where the results (JSON and markdown) go
RESULTS = ROOT / "benchmarks" / "results"
#: where the figures go (the docs and the README link there)
FIGURES = ROOT / "docs" / "img"


def machine() -> dict[str, Any]:
    """Python, torch, the platform and the processor (a benchmark's text gives its threads)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def describe(info: dict[str, Any]) -> str:
    """:func:`machine`'s description on one line (what an older record holds of it)."""
    parts = [info.get("processor"), info.get("platform")]
    parts += [f"Python {info['python']}" if "python" in info else None]
    parts += [f"torch {info['torch']}" if "torch" in info else None]
    return ", ".join(p for p in parts if p)


def command(module: str, argv: Sequence[str]) -> str:
    """The command line that runs ``benchmarks.<module>`` with ``argv``, quoted for a shell."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *map(str, argv)])


def write_markdown(folder: Path, name: str, markdown: str, record: dict[str, Any]) -> None:
    """``folder/name.md``: the markdown, then a line naming the record's command and machine."""
    footer = f"Command: `{record['command']}`. Machine: {describe(record['machine'])}."
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(markdown.rstrip("\n") + f"\n\n{footer}\n")


def write(
    folder: Path, name: str, data: dict[str, Any], markdown: str, command: str
) -> dict[str, Any]:
    """Writes ``folder/name.json`` (``data``, the command, the machine) and ``folder/name.md``.

    The markdown ends with a line naming the command and the machine. Returns the JSON's content.
    """
    record = {"command": command, "machine": machine(), **data}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(folder, name, markdown, record)
    return record
