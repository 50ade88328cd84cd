# Each target does its own set-up: a virtual environment in .venv with the package
# and its test extras installed (editable). Re-installs only when pyproject changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
SRC := $(wildcard guidediff tests benchmarks)

.PHONY: demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/guidediff demo --out "$(OUT)/demo"

lint: $(STAMP)
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

format: $(STAMP)
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

# pytest exits 5 when it collects no test; that must fail, so no `|| true` anywhere.
# Test files run in TEST_WORKERS processes (pytest-xdist, one file per worker at a
# time so module fixtures are shared); compiling leaves a core idle otherwise. Files
# are handed out longest first (the order tests/conftest.py collects them in; xdist
# would reorder them by their number of tests).
# tests/conftest.py sets XLA:CPU flags for fast compiles; the slow statistical tests
# run long computations and keep XLA's defaults.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder --durations=15

test-slow: $(STAMP)
	GUIDEDIFF_TEST_XLA_DEFAULTS=1 $(BIN)/python -m pytest -m slow -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/guidediff bench

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache .hypothesis
