# Two entry points for a fresh machine: `make demo` and `make test`. Each creates the virtual environment
# and installs what it needs the first time, then runs.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
INSTALLED := $(VENV)/.installed

export HF_HUB_OFFLINE := 1

.PHONY: demo test lint format clean

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hermes-pipeline needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(INSTALLED)
	$(BIN)/hermes-pipeline validate configs/recipes/tiny.yaml
	$(BIN)/hermes-pipeline plan configs/recipes/tiny.yaml
	$(BIN)/hermes-pipeline run configs/recipes/tiny.yaml

test: $(INSTALLED) lint
	$(BIN)/pytest --durations=12

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
