# make test: lint + tests; make demo: FFJORD vs TO-FLOW on a toy set, on the CPU, in a few minutes.
# Both work on a fresh clone with only Python: a virtual environment is created in .venv unless one is active,
# and the project is installed with constraints-cpu.txt, which pins the CPU build of torch.

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
DEMO_OUT ?= runs/demo

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(abspath $(VENV))/bin/python
endif

.PHONY: install test lint docs demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"

lint: install
	$(PY) -m ruff check torch_tempopt tests examples benchmarks

docs: install
	$(PY) -m mkdocs build --strict --site-dir site

test: install lint docs
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

demo: install
	OMP_NUM_THREADS=1 $(PY) -m examples.demo --out $(DEMO_OUT)

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache runs
