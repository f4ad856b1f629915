"""The ```python blocks of README.md and docs/**/*.md run: one test per Markdown file.

The convention for doc authors:

* Every block fenced as ```python runs; blocks fenced otherwise (```bash, ```text, ```diff, ```console, ...)
  do not. Fences may be indented (inside a list item) and may carry attributes (```python title="x.py").
* The blocks of one file run in order, in one namespace, in a fresh interpreter: the working directory is an
  empty temporary directory, the repository root is first on ``sys.path`` (``import torch_tempopt`` and
  ``import examples`` work), torch's default dtype is float32 as for a user, and a warning is an error, as in the
  rest of the suite. A traceback names the Markdown file and line.
* A block whose first line is ``# requires: zuko, cuda, env:FFJORD_DIR`` runs only when each requirement is met:
  a module that imports (``zuko``), ``cuda`` (``torch.cuda.is_available()``), or ``env:NAME`` (the environment
  variable NAME is set, e.g. the path of an upstream checkout). The file's other blocks still run, then the test
  reports the skipped blocks as a skip. A block that builds on a block with requirements repeats its line.
* A block whose first code line starts with ``>>>`` is a doctest: the output lines it shows are checked
  (ELLIPSIS and NORMALIZE_WHITESPACE).
* A file's blocks get ``DOC_TIMEOUT`` seconds in all: a recipe is an example, not a training run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_TIMEOUT = 120
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*\{?[ \t]*\.?(?P<lang>[\w+-]*)")
REQUIRES = re.compile(r"^#\s*requires:(?P<items>.*)$")

# Runs in the child interpreter: argv = [report path]; stdin = the blocks as JSON.
RUNNER = r"""
import doctest, importlib, json, os, sys

def unmet(items):
    for item in items:
        if item.startswith("env:"):
            if not os.environ.get(item[4:]):
                return f"environment variable {item[4:]} is not set"
        elif item == "cuda":
            import torch
            if not torch.cuda.is_available():
                return "CUDA is not available"
        else:
            try:
                importlib.import_module(item)
            except Exception as error:
                return f"{item} does not import ({type(error).__name__}: {error})"
    return None

namespace = {"__name__": "__main__"}
skipped = []
for block in json.load(sys.stdin):
    reason = unmet(block["requires"])
    if reason:
        skipped.append(f"{block['path']}:{block['line']}: {reason}")
        continue
    if block["doctest"]:
        where = (block["path"], block["path"], block["line"] - 1)
        test = doctest.DocTestParser().get_doctest(block["source"], namespace, *where)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        if runner.run(test, clear_globs=False).failed:
            sys.exit(f"{block['path']}:{block['line']}: the doctest above failed")
    else:
        exec(compile("\n" * (block["line"] - 1) + block["source"], block["path"], "exec"), namespace)
with open(sys.argv[1], "w") as report:
    json.dump(skipped, report)
"""


def python_blocks(text: str, path: str) -> list[dict]:
    """The ```python blocks of a Markdown text: source (dedented), first line number, requirements, doctest."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        i += 1
        if not opening:
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        start = i
        while i < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[i]):
            i += 1
        body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[start:i]]
        i += 1
        if opening["lang"] == "python":
            blocks.append(_block(body, start + 1, path))
    return blocks


def _block(body: list[str], line: int, path: str) -> dict:
    requires = REQUIRES.match(body[0].strip()) if body else None
    items = [item.strip() for item in requires["items"].split(",") if item.strip()] if requires else []
    code = [b for b in body if b.strip() and not b.lstrip().startswith("#")]
    doctest = bool(code) and code[0].lstrip().startswith(">>>")
    return {"source": "\n".join(body) + "\n", "line": line, "path": path, "requires": items, "doctest": doctest}


def run_blocks(blocks: list[dict], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the blocks in a fresh interpreter in an empty folder; returns the process and the skipped blocks."""
    cwd = Path(tempfile.mkdtemp(dir=tmp_path))
    report = cwd.with_suffix(".skipped.json")
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-W", "error", "-c", RUNNER, str(report)]
    try:
        result = subprocess.run(cmd, input=json.dumps(blocks), capture_output=True, text=True, cwd=cwd,
                                env=env, timeout=DOC_TIMEOUT)
    except subprocess.TimeoutExpired:
        path = blocks[0]["path"]
        pytest.fail(f"the python blocks of {path} ran past DOC_TIMEOUT={DOC_TIMEOUT} s; shorten the recipe")
    skipped = json.loads(report.read_text()) if result.returncode == 0 else []
    return result, skipped


def _doc_files() -> list[Path]:
    files = sorted((ROOT / "docs").glob("**/*.md")) + [ROOT / "README.md"]
    return [f for f in files if python_blocks(f.read_text(encoding="utf-8"), str(f))]


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path: Path, tmp_path: Path):
    blocks = python_blocks(path.read_text(encoding="utf-8"), str(path))
    result, skipped = run_blocks(blocks, tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    if skipped:
        reasons = "; ".join(s.replace(f"{ROOT}{os.sep}", "") for s in skipped)
        pytest.skip(f"{len(skipped)} of {len(blocks)} blocks not run: {reasons}")


MARKDOWN = """\
# A page

```bash
exit 1
```

1. A list item:

    ```python title="x.py"
    x = 2
    ```

```diff
-x = 1
```

~~~python
# requires: no_such_module_xyz, env:NO_SUCH_VARIABLE_XYZ
raise SystemExit("must not run")
~~~

```python
>>> x + 1
3
```
"""


def test_blocks_are_found_with_their_lines_requirements_and_kind():
    blocks = python_blocks(MARKDOWN, "page.md")
    assert [(b["line"], b["source"], b["requires"], b["doctest"]) for b in blocks] == [
        (10, "x = 2\n", [], False),
        (18, '# requires: no_such_module_xyz, env:NO_SUCH_VARIABLE_XYZ\nraise SystemExit("must not run")\n',
         ["no_such_module_xyz", "env:NO_SUCH_VARIABLE_XYZ"], False),
        (23, ">>> x + 1\n3\n", [], True),
    ]


def test_blocks_share_a_namespace_and_unmet_requirements_skip(tmp_path: Path):
    result, skipped = run_blocks(python_blocks(MARKDOWN, "page.md"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert skipped == ["page.md:18: no_such_module_xyz does not import (ModuleNotFoundError: No module named "
                       "'no_such_module_xyz')"]


def test_a_failure_names_the_markdown_line(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\ny = x / 0\n```\n\n```python\n>>> x\n2\n```\n")
    result, _ = run_blocks(python_blocks(page.read_text(), str(page)), tmp_path)
    assert result.returncode != 0
    assert f'File "{page}", line 5' in result.stderr and "ZeroDivisionError" in result.stderr
    page.write_text("```python\nx = 1\n```\n\n```python\n>>> x\n2\n```\n")
    result, _ = run_blocks(python_blocks(page.read_text(), str(page)), tmp_path)
    assert result.returncode != 0 and f"{page}:6: the doctest above failed" in result.stderr
