# mes_tasks: `make run` starts the whole system, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MES_VAR_DIR ?= var
# Every install resolves the versions in this file; `make lock` refreshes it (docs/development.md).
LOCK := requirements.lock
UV_VERSION := 0.13.9
LOCK_PYTHON := 3.11

.PHONY: install lock lock-upgrade versions run shell demo test test-fast lint format bench chaos verify-run clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# Pins what pyproject.toml newly asks for and keeps every other pin; lock-upgrade moves them all.
# Not after install: a pyproject.toml that the old lock cannot satisfy must still be lockable.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --universal --python-version $(LOCK_PYTHON) \
		--custom-compile-command "make lock" --quiet -o $(LOCK) $(LOCK_ARGS)

lock-upgrade:
	$(MAKE) lock LOCK_ARGS=--upgrade

versions: install
	@$(PY) -m devtools.versions

run: install
	$(PY) -m devtools.devserver run

# A shell on the stack `make run` started: its settings, and the venv's celery on PATH.
shell: install
	@test -f $(MES_VAR_DIR)/stack.env || { echo "error [NO_STACK]: $(MES_VAR_DIR)/stack.env is missing: start the stack with make run first"; exit 1; }
	@echo "operator shell on the make run stack (exit to leave); try: celery -A mes_tasks queue status"
	@bash --rcfile $(MES_VAR_DIR)/stack.env -i

demo: install
	$(PY) -m devtools.demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m fast

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy mes_tasks devtools

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

chaos: install
	$(PY) -m devtools.chaos $(CHAOS_ARGS)

verify-run: install
	$(PY) -m devtools.verifyrun $(VERIFY_RUN_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
