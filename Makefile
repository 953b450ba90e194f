# Entry points: `make reproduce` runs the default study, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PARAMS ?= params/cpu.yaml
# A bare torch requirement pulls a multi-GB CUDA build; the CPU study pins the CPU wheel.
# GPU users: make install TORCH_SPEC='torch'
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kp-installed

.PHONY: install reproduce test lint clean-runs

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	touch $(STAMP)

install: $(STAMP)

reproduce: install
	$(PY) -m kp_utils run $(PARAMS)

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check kp_utils tests benchmarks

clean-runs:
	rm -rf runs
