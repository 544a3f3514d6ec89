# The two commands: `make demo` runs the end-to-end demo on the local backend, `make test` runs
# lint and tests. Both set everything up on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_FLAGS := --quiet --disable-pip-version-check

CHECKOV_VENV := .venv-checkov

.PHONY: setup test lint typecheck infra-check demo bench clean

setup: $(VENV)/.installed node_modules/.installed

# torch goes in first and alone: anything that depends on it then finds 2.13.0 already there
# instead of pulling a different build.
$(VENV)/.installed: requirements.txt requirements-local.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) torch==2.13.0
	$(PIP) install $(PIP_FLAGS) -r requirements.txt -r requirements-local.txt -r requirements-dev.txt -c constraints.txt
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(CHECKOV_VENV)/.installed: requirements-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install $(PIP_FLAGS) -r requirements-checkov.txt
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# Static checks of infra/ (nothing here can reach Azure). --skip-download: checkov must not phone home.
infra-check: $(CHECKOV_VENV)/.installed
	$(CHECKOV_VENV)/bin/checkov --directory infra --framework bicep --skip-download --compact --quiet

test: lint typecheck infra-check
	$(PY) -m pytest

demo: setup
	$(PY) -m shared.cli demo

bench: setup
	$(PY) bench/cold_start.py

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) node_modules .pytest_cache .ruff_cache .mypy_cache .hypothesis .local
