# llmray developer entry points. Each target builds its own .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test lint format demo gpu-test clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

venv: $(BIN)/activate

lint: venv
	$(BIN)/ruff check llmray tests bench jobs
	$(BIN)/ruff format --check llmray tests bench jobs
	$(BIN)/mypy llmray

format: venv
	$(BIN)/ruff format llmray tests bench jobs
	$(BIN)/ruff check --fix llmray tests bench jobs

test: venv lint
	$(BIN)/pytest -q

# stages, times and losses only; `make demo ARGS=--verbose` adds Ray's logs and every step line
demo: venv
	$(BIN)/llmray demo $(ARGS)

gpu-test:
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
