# make test: ruff, the docs site (mkdocs build --strict), the sdist and the wheel (python -m build, then
#            twine check --strict), then pytest, which also runs the docs' ```python blocks (tests/test_docs.py)
#            and a part of the suite from the unpacked sdist (tests/test_packaging.py).
# make demo: FFJORD against a 4-step budget and TO-FLOW on it, on a toy set, on the CPU, in a few minutes.
# Both work on a fresh clone with only Python: a virtual environment is created in .venv unless one is active.
# `make test` installs the project with its dev extra and constraints-cpu.txt (Python >= 3.11, which the docs tools
# need); `make demo` installs only what the demo needs, the project with its examples extra (matplotlib, tqdm,
# scikit-learn) and the same constraints, so it leaves an active environment's other packages alone.
#
# Which torch: constraints-cpu.txt pins torch==2.13.0, and a version pin does not choose the CPU build. Where pip
# already sees a CPU build of that version (installed, or a wheel in a local directory or index pip is configured
# with, as on this project's machines and CI), the pin takes it. Elsewhere on Linux, PyPI's torch 2.13.0 is the
# CUDA build, several GB with its nvidia-* packages. To take the CPU build from PyTorch's wheel index instead:
#     make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# which adds `--extra-index-url $(TORCH_INDEX)` to pip (the pin then resolves to 2.13.0+cpu). Unset, pip uses only
# the indexes it is configured with.
# Offline, `make package BUILD_FLAGS=--no-isolation` builds with the environment's setuptools instead of a fresh one.

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
TORCH_INDEX ?=
BUILD_FLAGS ?=
DEMO_OUT ?= runs/demo

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(abspath $(VENV))/bin/python
endif

PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: install install-examples test lint docs package demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_INDEX) -c $(CONSTRAINTS) -e ".[dev]"

# The whole repository, lines within 99 columns; pyproject.toml names the files not yet formatted or wrapped.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

docs: install
	$(PY) -m mkdocs build --strict --site-dir site

# The sdist, and the wheel built from it, into dist/; their metadata and README rendering checked strictly.
package: install
	rm -rf dist
	$(PY) -m build $(BUILD_FLAGS) --outdir dist .
	$(PY) -m twine check --strict dist/*

test: install lint docs package
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# What the demo needs: the project and its examples extra, not the dev tools.
install-examples: $(PY)
	$(PY) -m pip install --quiet $(PIP_INDEX) -c $(CONSTRAINTS) -e ".[examples]"

demo: install-examples
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.demo --out $(DEMO_OUT)

bench: install
	$(PY) -m benchmarks.overhead

clean:
	rm -rf build dist site *.egg-info .pytest_cache .ruff_cache runs
