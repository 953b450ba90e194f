# Entry points: `make reproduce` runs the default study, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
# The default study: the capacity sweep, then the paper's grid. Each file runs all four notebooks.
PARAMS ?= params/cpu_capacity.yaml params/cpu.yaml
# The second model for the two-model comparison (Figure 5), about 20 minutes more on 2 cores.
COMPARE_PARAMS ?= params/cpu_gemma.yaml
# A bare torch requirement pulls a multi-GB CUDA build; the CPU study pins the CPU wheel.
# GPU users: make install TORCH_SPEC='torch'
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kp-installed

.PHONY: install reproduce compare test lint clean-runs

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	touch $(STAMP)

install: $(STAMP)

reproduce: install
	for params in $(PARAMS); do $(PY) -m kp_utils run $$params || exit $$?; done

# Runs the second model's study, then redraws the default study's figures with Figure 5.
compare: install
	$(PY) -m kp_utils run $(COMPARE_PARAMS)
	$(PY) -m kp_utils run params/cpu.yaml --only 04

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check kp_utils tests benchmarks

clean-runs:
	rm -rf runs
