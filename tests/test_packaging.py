"""The package as a user gets it: the sdist and the wheel build without warnings and carry the
right files, the installed wheel works without the source tree, the sdist's own tests run from the
unpacked archive, and README.md (the package index's project page) links only to absolute
addresses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email import message_from_string
from email.message import Message
from pathlib import Path
from typing import NamedTuple

import pytest
from packaging.version import Version

import torch_tempopt

ROOT = Path(__file__).resolve().parents[1]
REPO = "torch-tempopt/torch_tempopt"
EXTRAS = {"test", "docs", "examples", "mnist", "zuko", "torchode", "dev"}
PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]
# distutils notes that are not about the package: a global-exclude with nothing to exclude (no .pyc
# under PYTHONDONTWRITEBYTECODE=1), and byte-compiling switched off by that same variable.
BENIGN = re.compile(
    r"no previously-included files matching '\*\.py\[cod\]'|byte-compiling is disabled"
)


class Built(NamedTuple):
    sdist: Path
    wheel: Path
    log: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The sdist and the wheel built from it, with this environment's setuptools,
    warnings shown.
    """
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONWARNINGS="default")
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return Built(sdist, wheel, log)


def wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return message_from_string(archive.read(name).decode())


def test_build_log_has_no_warnings(built: Built):
    lines = built.log.splitlines()
    noisy = [
        line for line in lines if re.search(r"(?i)warn|deprecat", line) and not BENIGN.search(line)
    ]
    assert not noisy, "\n".join(noisy)


def test_twine_check_strict(built: Built):
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(built.sdist), str(built.wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_metadata(built: Built):
    meta = wheel_metadata(built.wheel)
    assert (
        meta["Version"] == torch_tempopt.__version__
    )  # setup.cfg reads it from torch_tempopt/__init__.py
    version = Version(torch_tempopt.__version__)
    assert (
        str(version) == torch_tempopt.__version__
        and not version.is_devrelease
        and not version.local
    )
    changes = (
        (ROOT / "docs" / "changes.md").read_text().splitlines()[0]
    )  # the changelog's newest entry is this one
    assert changes == f"# Changes in {version.major}.{version.minor}", changes
    assert (meta["License-Expression"], meta.get_all("License-File")) == ("MIT", ["LICENSE"])
    classifiers = meta.get_all("Classifier")
    assert not [c for c in classifiers if c.startswith("License ::")]
    versions = [
        re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c) for c in classifiers
    ]
    assert [v[1] for v in versions if v] == PYTHONS
    assert meta["Requires-Python"] == f">={PYTHONS[0]}"
    assert set(meta.get_all("Provides-Extra")) == EXTRAS
    assert "torchdyn" not in " ".join(f"{key}: {value}" for key, value in meta.items()).lower()
    assert meta.get_payload().strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()
    license_text = (ROOT / "LICENSE").read_text()
    assert (
        license_text.startswith("MIT License")
        and "Copyright (c) 2026 the torch_tempopt developers" in license_text
    )


def test_dev_extra_holds_every_other_extra(built: Built):
    by_extra: dict[str, set[str]] = {}
    for requirement in wheel_metadata(built.wheel).get_all("Requires-Dist"):
        spec, _, marker = requirement.partition(";")
        extra = re.search(r"extra == \"(\w+)\"", marker)
        by_extra.setdefault(extra[1] if extra else "", set()).add(spec.strip())
    others = set().union(*(by_extra[e] for e in EXTRAS - {"dev"}))
    assert others <= by_extra["dev"], others - by_extra["dev"]


def test_wheel_holds_the_package_only(built: Built):
    with zipfile.ZipFile(built.wheel) as archive:
        names = archive.namelist()
    dist_info = f"torch_tempopt-{torch_tempopt.__version__}.dist-info/"
    assert "torch_tempopt/py.typed" in names and f"{dist_info}licenses/LICENSE" in names
    assert not [n for n in names if not n.startswith(("torch_tempopt/", dist_info))]
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "torch_tempopt").rglob("*.py")}
    assert sources <= set(names), sources - set(names)


def test_sdist_carries_what_its_tests_and_docs_need(built: Built):
    with tarfile.open(built.sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    wanted = {
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "setup.cfg",
        "MANIFEST.in",
        "Makefile",
        "constraints-cpu.txt",
        "mkdocs.yml",
        "torch_tempopt/py.typed",
    }
    for folder, pattern in [
        ("torch_tempopt", "*.py"),
        ("tests", "*"),
        ("examples", "*.py"),
        ("benchmarks", "*.py"),
        ("docs", "*.md"),
    ]:
        wanted |= {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / folder).rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts and ".hypothesis" not in p.parts
        }
    assert wanted <= names, sorted(wanted - names)
    assert not [
        n
        for n in names
        if n.endswith((".pyc", ".pyo")) or n.startswith((".venv/", "runs/", "site/"))
    ]


def test_installed_wheel_works_without_the_source_tree(built: Built, tmp_path: Path):
    site = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--target",
        str(site),
    ]
    subprocess.run([*pip, str(built.wheel)], check=True, capture_output=True, timeout=120)
    code = (
        "import torch, torchdiffeq, torch_tempopt\n"
        "from torch_tempopt import LearnableHorizon\n"
        "from torch_tempopt.contrib import final_state_solver, torchode_solver, zuko_solver\n"
        "horizon = LearnableHorizon(T0=0.5)\n"
        "z = horizon(lambda t, y: -y, torch.ones(3, 2), method='rk4', "
        "options=dict(step_size=0.125))\n"
        "z[-1].sum().backward()\n"
        "print(torch_tempopt.__file__, tuple(z.shape), horizon.T.grad is not None)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(site / "torch_tempopt" / "__init__.py"),
        "(2,",
        "3,",
        "2)",
        "True",
    ]


@pytest.mark.slow
def test_tests_run_from_the_unpacked_sdist(built: Built, tmp_path: Path):
    with tarfile.open(built.sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.9.17, 3.10.12, 3.11.4, 3.12
            archive.extractall(tmp_path, filter="data")
        else:
            archive.extractall(tmp_path)
    (root,) = tmp_path.iterdir()
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    where = subprocess.run(
        [sys.executable, "-c", "import torch_tempopt; print(torch_tempopt.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where == str(root / "torch_tempopt" / "__init__.py")
    pytest_ = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    collected = subprocess.run(
        [*pytest_, "--collect-only"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collected.returncode == 0, collected.stdout[-4000:] + collected.stderr[-4000:]
    ran = subprocess.run(
        [*pytest_, "-x", "tests/test_nfe_and_package.py", "torch_tempopt"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    assert re.search(r"\d+ passed", ran.stdout), ran.stdout[-2000:]


def _targets(markdown: str) -> tuple[list[str], list[str]]:
    """The link and image targets of a Markdown text (code spans and fenced blocks left out):
    (links, images).
    """
    text = re.sub(r"(?ms)^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", "", markdown)
    text = re.sub(r"(`+).*?\1", "", text)
    images = re.findall(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)", text)
    images += re.findall(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)", text)
    links = re.findall(r"\]\(\s*<?([^)\s>]+)", text) + re.findall(
        r"(?m)^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", text
    )
    links += re.findall(r"<a\b[^>]*\bhref\s*=\s*[\"']([^\"']+)", text)
    return links, images


def readme_problems(markdown: str, root: Path) -> list[str]:
    """What breaks on a package index: relative addresses, images at /blob/, links to files the
    repository lacks.
    """
    links, images = _targets(markdown)
    problems = [
        f"relative link {t}: use https://github.com/{REPO}/blob/main/{t}"
        for t in links
        if t not in images and not t.startswith(("https://", "http://", "mailto:", "#"))
    ]
    problems += [
        f"relative image {t}: use https://raw.githubusercontent.com/{REPO}/main/{t}"
        for t in images
        if not t.startswith(("https://", "http://"))
    ]
    problems += [
        f"image {t}: a /blob/ address serves a web page; use /raw/"
        for t in images
        if t.startswith(f"https://github.com/{REPO}/blob/")
    ]
    ours = (
        rf"^https://(github\.com/{REPO}/(blob|tree|raw)|raw\.githubusercontent\.com/{REPO})/main/"
    )
    for target in links + images:
        path = re.sub(ours, "", target).split("#")[0]
        if path != target.split("#")[0] and not (root / path).exists():
            problems.append(f"{target}: {path} is not in the repository")
    return problems


def test_readme_links_and_images_work_on_a_package_index():
    problems = readme_problems((ROOT / "README.md").read_text(encoding="utf-8"), ROOT)
    assert not problems, "README.md is the package index's project page:\n" + "\n".join(problems)


def test_readme_problems_are_found():
    markdown = (
        "[a](docs/a.md) ![i](https://x/i.png) `[c](code.md)` <img src='img.png'> [top](#top)\n"
        f"![b](https://github.com/{REPO}/blob/main/docs/img/densities.png)\n"
        f"[d](https://github.com/{REPO}/blob/main/LICENSE) [e](https://github.com/{REPO}/tree/main/no/such/dir#x)\n"
        f"![f](https://raw.githubusercontent.com/{REPO}/main/docs/img/densities.png)\n"
        "```python\nx[0](1)\n```\n[ref]: https://y\n"
    )
    assert readme_problems(markdown, ROOT) == [
        f"relative link docs/a.md: use https://github.com/{REPO}/blob/main/docs/a.md",
        f"relative image img.png: use https://raw.githubusercontent.com/{REPO}/main/img.png",
        f"image https://github.com/{REPO}/blob/main/docs/img/densities.png: "
        "a /blob/ address serves a web page; use /raw/",
        f"https://github.com/{REPO}/tree/main/no/such/dir#x: no/such/dir is not in the repository",
    ]
