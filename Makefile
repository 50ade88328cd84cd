# Each target does its own set-up: a virtual environment in .venv with the package
# and its test extras installed (editable). Re-installs only when pyproject changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/guidediff demo --out $(OUT)/demo

lint: $(STAMP)
	$(BIN)/ruff check guidediff tests benchmarks
	$(BIN)/ruff format --check guidediff tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format guidediff tests benchmarks
	$(BIN)/ruff check --fix guidediff tests benchmarks

# pytest exits 5 when it collects no test; that must fail, so no `|| true` anywhere.
test: lint
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
