"""Where the code lives: examples/ and benchmarks/ do not import each other, the package imports
neither, the optional torch_tempopt.patches is imported only by its users, and each patch names the
upstream commit it was checked against."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from torch_tempopt.patches import Upstream

ROOT = Path(__file__).resolve().parents[1]
PATCHES = {"ffjord", "rnode", "otflow", "enf"}
# An import statement, also in code that a benchmark hands to a child process as a string (or in a
# shell heredoc).
IMPORT_LINE = re.compile(
    r"^\s*(?:from\s+(?P<source>\w+)[\w.]*\s+import\s|import\s+(?P<module>\w+))", re.MULTILINE
)


def imported(path: Path) -> set[str]:
    """The top-level modules ``path`` imports (import statements, or lines of its strings)."""
    text = path.read_text()
    tops = {m["source"] or m["module"] for m in IMPORT_LINE.finditer(text)}
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                tops |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("examples", {"benchmarks"}),
        ("benchmarks", {"examples"}),
        ("torch_tempopt", {"benchmarks", "examples"}),
    ],
)
def test_examples_and_benchmarks_do_not_import_each_other(
    folder: str, forbidden: set[str]
) -> None:
    files = [
        p
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".sh") and "__pycache__" not in p.parts
    ]
    assert files
    offenders = {p.relative_to(ROOT).as_posix(): sorted(imported(p) & forbidden) for p in files}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_import_check_sees_imports_in_code_and_in_strings(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text(
        "import os.path\nfrom benchmarks.harness import cnf\n"
        'CHILD = """\nfrom examples import a\n"""\n'
    )
    assert imported(source) >= {"os", "benchmarks", "examples"}


FILES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "benchmarks").rglob("*.py")
    if "__pycache__" not in p.parts
)
MODULES = [f[: -len(".py")].replace("/", ".") for f in FILES if not f.endswith("__init__.py")]


def _names_all(tree: ast.Module) -> bool:
    """Whether a module assigns ``__all__`` at its top level."""
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    return False


@pytest.mark.parametrize("path", FILES)
def test_benchmarks_are_modules_of_a_package(path: str) -> None:
    """A docstring and ``__all__``; no sys.path edits; children run modules, not code strings."""
    text = (ROOT / path).read_text()
    tree = ast.parse(text)
    assert ast.get_docstring(tree) and _names_all(tree), path
    assert "sys.path" not in text and "E402" not in text and '"-c"' not in text, path


@pytest.mark.parametrize("module", MODULES)
def test_every_benchmark_command_answers_help(
    module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m benchmarks.NAME --help`` for every module with a ``main``."""
    if module == "benchmarks.fm_likelihood":
        pytest.importorskip("flow_matching")
    loaded = importlib.import_module(module)
    if not hasattr(loaded, "main"):
        pytest.skip(f"{module} is imported by the commands, not run")
    with pytest.raises(SystemExit) as stop:
        loaded.main(["--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out


def patch_modules() -> dict[str, object]:
    found = {}
    for path in sorted((ROOT / "torch_tempopt" / "patches").glob("*.py")):
        module = importlib.import_module(f"torch_tempopt.patches.{path.stem}")
        if any(isinstance(value, Upstream) for value in vars(module).values()):
            found[path.stem] = module
    return found


def test_each_patch_names_its_repository_and_full_commit() -> None:
    modules = patch_modules()
    assert set(modules) == PATCHES
    for name, module in modules.items():
        (upstream,) = [v for v in vars(module).values() if isinstance(v, Upstream)]
        assert re.fullmatch(r"[0-9a-f]{40}", upstream.commit), name
        assert upstream.commit == module.COMMIT and upstream.name == name
        assert f"{upstream.repo}@{upstream.commit}" in " ".join(module.__doc__.split()), name
        script = ROOT / "examples" / f"{name}_patch.py"  # the command users run, a thin script
        assert imported(script) - {"sys"} == {"torch_tempopt"}, script


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is Python >= 3.10")
def test_patches_are_optional_and_import_nothing_beyond_torch_torchdiffeq_numpy() -> None:
    code = (
        "import sys\n"
        "import numpy, torch, torchdiffeq\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import torch_tempopt\n"
        "assert 'torch_tempopt.patches' not in sys.modules\n"
        f"for name in {sorted(PATCHES | {'runner', 'torchvision_cpu'})}:\n"
        "    __import__('torch_tempopt.patches.' + name)\n"
        "new = {m.split('.')[0] for m in sys.modules} - before - set(sys.stdlib_module_names)\n"
        "print(sorted(new))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "['torch_tempopt']"


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_the_commands_run(name: str) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}_patch.py"), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"usage: {name}_patch.py" in done.stdout and f"--{name}" in done.stdout


def test_the_ddp_example_draws_the_benchmarks_toy_sets() -> None:
    """examples/ddp_train.py copies the toy sets (it imports no benchmark): the same points."""
    from benchmarks.harness.data import TOY_DATASETS, toy_sample
    from examples import ddp_train

    assert ddp_train.TOY_DATASETS == TOY_DATASETS
    for name in TOY_DATASETS:
        for n in (1, 7, 100):
            mine = ddp_train.toy_sample(name, n, np.random.default_rng(3))
            np.testing.assert_array_equal(
                mine, toy_sample(name, n, np.random.default_rng(3)), err_msg=name
            )
            assert mine.dtype == np.float32 and mine.flags["C_CONTIGUOUS"]
