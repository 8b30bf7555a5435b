# From a fresh clone (README's Quickstart): `make smoke`, `make demo-base`, `make test`; each creates .venv and installs first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install test demo demo-base demo-sweep demo-frontier smoke clean

install: $(STAMP)

# The CPU build of torch first, through pip (on this machine's disk, seconds; pip's config and constraints
# apply); pyproject's torch range then keeps it instead of pulling a multi-GB CUDA build. On a GPU machine
# install the CUDA build first instead. The project's other ~200 packages through uv: the same versions as
# pip's, `make install` 65 s instead of 104 (BENCHMARKS.md §14). Compiled to bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set (as on this machine) nothing else writes the .pyc files, and every process would
# compile its imports again (3-4 s each; the suite 1.5x as long). uv reads neither pip.conf nor pip's constraints
# file: where a package index is set for pip only, `make install PROJECT_INSTALL='$(PY) -m pip install --quiet'`.
TORCH ?= torch==2.13.0
PROJECT_INSTALL ?= $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH)' uv
	$(PROJECT_INSTALL) -e '.[test]'
	touch $(STAMP)

# Two workers (pytest-xdist) on the 2-core machines this is developed on, each test file on one worker (its module
# fixtures, e.g. a server, are set up once), the longest files first (tests/conftest.py orders them). `pytest -q`
# alone runs the same suite in one process.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

smoke: $(STAMP)
	$(VENV)/bin/ftstudy run --preset smoke

demo: $(STAMP)
	$(VENV)/bin/ftstudy run --preset demo

# The seed's recipe on a pretrained base model (gemma-3-270m) as far as 2 CPU cores allow (docs/results.md).
demo-base: $(STAMP)
	$(VENV)/bin/ftstudy run --preset demo-base

# Six arms x two seeds on the demo's data: under an hour on 2 CPU cores (docs/results.md).
demo-sweep: $(STAMP)
	$(VENV)/bin/ftstudy run --preset demo-sweep

# demo-base at its earlier 30 steps with each method at three learning rates and replay at 1% and 10%:
# the arms at equal gain, each at its best.
demo-frontier: $(STAMP)
	$(VENV)/bin/ftstudy run --preset demo-frontier

clean:
	rm -rf $(VENV) .prefect artifacts
