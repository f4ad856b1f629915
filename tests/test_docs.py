"""The pages read where users read them: the ```python blocks of README.md and docs/**/*.md run
(one test per Markdown file), the generated results tables are the results files, and the README
stays short.

The convention for doc authors:

* Every block fenced as ```python runs; blocks fenced otherwise (```bash, ```text, ```diff,
  ```console, ...) do not. Fences may be indented (inside a list item) and may carry attributes
  (```python title="x.py").
* Each block runs as a script of its own, as a reader who copies it would run it: the blocks of
  one file run in order in one fresh interpreter, each in a fresh namespace, in an empty temporary
  directory, with only ``torch_tempopt`` (this checkout's) importable from the repository
  (``import examples`` or ``import benchmarks`` fails, as for a user who installed the package),
  torch's default dtype float32 as for a user, and a warning an error, as in the rest of the
  suite. A traceback names the Markdown file and line.
* A block whose leading comment lines include ``# continues the block above`` runs in the
  namespace of the blocks before it instead, and says so to the reader. A file's first block
  cannot continue anything.
* A block whose first line is ``# requires: zuko, cuda, env:FFJORD_DIR`` runs only when each
  requirement is met: a module that imports (``zuko``), ``cuda`` (``torch.cuda.is_available()``),
  or ``env:NAME`` (the environment variable NAME is set, e.g. the path of an upstream checkout).
  The file's other blocks still run, then the test reports the skipped blocks as a skip. A block
  that continues a block with requirements repeats its line.
* A block whose first code line starts with ``>>>`` is a doctest: the output lines it shows are
  checked (ELLIPSIS and NORMALIZE_WHITESPACE).
* A file's blocks get ``DOC_TIMEOUT`` seconds in all: a recipe is an example, not a training run.

A results table between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` is
``benchmarks/results/NAME.md`` verbatim (``benchmarks/update_readme.py`` refills the tables);
pages include no files (``--8<--``), which GitHub would show as raw lines. README.md holds at most
``README_WORDS`` words of prose.
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
README_WORDS = 1200
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*\{?[ \t]*\.?(?P<lang>[\w+-]*)")
REQUIRES = re.compile(r"^#\s*requires:(?P<items>.*)$")
CONTINUES = "# continues the block above"
RESULTS = re.compile(
    r"<!-- results:(?P<name>[\w.+-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S
)

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

namespace, skipped, ran = {}, [], False
for block in json.load(sys.stdin):
    reason = unmet(block["requires"])
    if block["continues"] and not ran:
        reason = reason or "it continues a block that did not run"
    ran = not reason
    if reason:
        skipped.append(f"{block['path']}:{block['line']}: {reason}")
        continue
    if not block["continues"]:
        namespace = {"__name__": "__main__"}
    if block["doctest"]:
        where = (block["path"], block["path"], block["line"] - 1)
        test = doctest.DocTestParser().get_doctest(block["source"], namespace, *where)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        if runner.run(test, clear_globs=False).failed:
            sys.exit(f"{block['path']}:{block['line']}: the doctest above failed")
    else:
        source = "\n" * (block["line"] - 1) + block["source"]
        exec(compile(source, block["path"], "exec"), namespace)
with open(sys.argv[1], "w") as report:
    json.dump(skipped, report)
"""


def python_blocks(text: str, path: str) -> list[dict]:
    """The ```python blocks of a Markdown text: source, first line, requirements, kind."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        i += 1
        if not opening:
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        start = i
        while i < len(lines) and not re.match(
            rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[i]
        ):
            i += 1
        body = [
            line[indent:] if line[:indent].strip() == "" else line.lstrip()
            for line in lines[start:i]
        ]
        i += 1
        if opening["lang"] == "python":
            blocks.append(_block(body, start + 1, path))
    return blocks


def _block(body: list[str], line: int, path: str) -> dict:
    requires = REQUIRES.match(body[0].strip()) if body else None
    items = (
        [item.strip() for item in requires["items"].split(",") if item.strip()] if requires else []
    )
    code = [b for b in body if b.strip() and not b.lstrip().startswith("#")]
    leading = [b.strip() for b in body[: body.index(code[0]) if code else len(body)]]
    doctest = bool(code) and code[0].lstrip().startswith(">>>")
    return {
        "source": "\n".join(body) + "\n",
        "line": line,
        "path": path,
        "requires": items,
        "doctest": doctest,
        "continues": CONTINUES in leading,
    }


def run_blocks(
    blocks: list[dict], tmp_path: Path
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the blocks in a fresh interpreter in an empty folder; returns it and the skips."""
    cwd = Path(tempfile.mkdtemp(dir=tmp_path))
    report = cwd.with_suffix(".skipped.json")
    package = Path(
        tempfile.mkdtemp(dir=tmp_path)
    )  # this checkout's torch_tempopt, and nothing else of it
    (package / "torch_tempopt").symlink_to(ROOT / "torch_tempopt", target_is_directory=True)
    pythonpath = os.pathsep.join(p for p in (str(package), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-W", "error", "-c", RUNNER, str(report)]
    try:
        result = subprocess.run(
            cmd,
            input=json.dumps(blocks),
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=DOC_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        path = blocks[0]["path"]
        pytest.fail(
            f"the python blocks of {path} ran past DOC_TIMEOUT={DOC_TIMEOUT} s; shorten the recipe"
        )
    skipped = json.loads(report.read_text()) if result.returncode == 0 else []
    return result, skipped


def _doc_files() -> list[Path]:
    files = sorted((ROOT / "docs").glob("**/*.md")) + [ROOT / "README.md"]
    return [f for f in files if python_blocks(f.read_text(encoding="utf-8"), str(f))]


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path: Path, tmp_path: Path):
    blocks = python_blocks(path.read_text(encoding="utf-8"), str(path))
    assert not blocks[0]["continues"], (
        f"{path}:{blocks[0]['line']}: the first block has no block above"
    )
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

```python
# continues the block above
>>> x + 1
3
```

~~~python
# requires: no_such_module_xyz, env:NO_SUCH_VARIABLE_XYZ
raise SystemExit("must not run")
~~~

```python
# continues the block above
raise SystemExit("must not run either")
```

```python
import os

assert "x" not in dir() and os.listdir() == []  # a script of its own, in an empty folder
import torch_tempopt

try:
    import examples
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the repository's examples must not be importable")
```
"""


def test_blocks_are_found_with_their_lines_requirements_and_kind():
    blocks = python_blocks(MARKDOWN, "page.md")
    assert [(b["line"], b["requires"], b["doctest"], b["continues"]) for b in blocks] == [
        (10, [], False, False),
        (18, [], True, True),
        (24, ["no_such_module_xyz", "env:NO_SUCH_VARIABLE_XYZ"], False, False),
        (29, [], False, True),
        (34, [], False, False),
    ]
    assert (
        blocks[0]["source"] == "x = 2\n"
        and blocks[1]["source"] == "# continues the block above\n>>> x + 1\n3\n"
    )


def test_each_block_is_a_script_unless_it_continues_and_unmet_requirements_skip(tmp_path: Path):
    result, skipped = run_blocks(python_blocks(MARKDOWN, "page.md"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert skipped == [
        "page.md:24: no_such_module_xyz does not import (ModuleNotFoundError: No module named "
        "'no_such_module_xyz')",
        "page.md:29: it continues a block that did not run",
    ]


def test_a_failure_names_the_markdown_line(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\ny = x / 0\n```\n\n```python\n>>> x\n2\n```\n")
    result, _ = run_blocks(python_blocks(page.read_text(), str(page)), tmp_path)
    assert result.returncode != 0
    assert f'File "{page}", line 5' in result.stderr and "ZeroDivisionError" in result.stderr
    page.write_text(
        "```python\nx = 1\n```\n\n```python\n# continues the block above\n>>> x\n2\n```\n"
    )
    result, _ = run_blocks(python_blocks(page.read_text(), str(page)), tmp_path)
    assert result.returncode != 0 and f"{page}:6: the doctest above failed" in result.stderr
    page.write_text("```python\nx = 1\n```\n\n```python\nprint(x)\n```\n")
    result, _ = run_blocks(python_blocks(page.read_text(), str(page)), tmp_path)
    assert (
        result.returncode != 0 and "NameError" in result.stderr
    )  # no marker: a script of its own


def prose_words(markdown: str) -> int:
    """Words of prose: outside fenced blocks, generated results tables and HTML comments; a link
    counts its text, not its address. A word is a whitespace-separated token with a letter or a
    digit in it."""
    text = re.sub(r"(?ms)^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", "", markdown)
    text = RESULTS.sub("", text)
    text = re.sub(r"(?s)<!--.*?-->", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return len(re.findall(r"\S*[A-Za-z0-9]\S*", text))


def test_prose_words_leave_out_code_results_comments_and_addresses():
    markdown = (
        "Two words.\n\n```bash\nmake demo and more\n```\n<!-- a comment -->\n"
        "<!-- results:x -->\n| a | b |\n<!-- /results:x -->\n"
        "[a link](https://example.com/long/address) - x\n"
    )
    assert prose_words(markdown) == 5


def test_readme_prose_is_short():
    words = prose_words((ROOT / "README.md").read_text(encoding="utf-8"))
    assert words <= README_WORDS, (
        f"README.md has {words} words of prose (at most {README_WORDS}): move to docs/"
    )


def _pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("**/*.md"))


def test_results_tables_are_the_results_files():
    stale = []
    for page in _pages():
        for m in RESULTS.finditer(page.read_text(encoding="utf-8")):
            source = ROOT / "benchmarks" / "results" / f"{m['name']}.md"
            if (
                not source.exists()
                or m["body"].strip() != source.read_text(encoding="utf-8").strip()
            ):
                stale.append(
                    f"{page.relative_to(ROOT)}: results:{m['name']} differs from "
                    f"{source.relative_to(ROOT)}"
                )
    assert not stale, "copy each results file between its markers:\n" + "\n".join(stale)


def test_pages_include_no_files():
    lines = [
        f"{page.relative_to(ROOT)}:{i}"
        for page in _pages()
        for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if re.match(r"^[ \t]*-{1,}8<-{1,}", line)
    ]
    assert not lines, (
        "GitHub shows an include as a raw line; put the file's text between results markers:\n"
        + "\n".join(lines)
    )
