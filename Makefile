# mes_tasks: `make run` starts the whole system, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MES_VAR_DIR ?= var

.PHONY: install run shell demo test test-fast lint format bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
