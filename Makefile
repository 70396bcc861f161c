# llmray developer entry points. Each target builds its own .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test test-fast lint format demo gpu-test clean

# Bytecode: Python compiles a module on its first import and writes the .pyc next to it, so every later
# process (the test workers, each Ray worker, engine core and training rank: hundreds of processes) loads it
# compiled. Compiling the whole venv up front (pip's default, or compileall) costs ~110 CPU-s for the
# ~20k installed files, of which the tests import about a third: install with --no-compile instead. Some
# environments set PYTHONDONTWRITEBYTECODE, which would make every process compile everything it imports
# again (torch alone ~5 CPU-s, llmray ~0.5, pytest's assertion rewrite of the test modules and plugins
# ~9): make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --upgrade pip
	$(BIN)/pip install -q --no-compile torch==2.13.0 -e ".[test]"

venv: $(BIN)/activate

lint: venv
	$(BIN)/ruff check llmray tests bench jobs
	$(BIN)/ruff format --check llmray tests bench jobs
	$(BIN)/mypy llmray

format: venv
	$(BIN)/ruff format llmray tests bench jobs
	$(BIN)/ruff check --fix llmray tests bench jobs

# Two pytest-xdist workers, one test module each at a time (module-scoped fixtures, e.g. one Ray or one Serve
# app per module, stay in one process), the slowest modules first (tests/conftest.py: SLOW_MODULES). Most
# of the suite waits on Ray, Serve and subprocess start-up, so two workers nearly halve it on 2 cores. A
# worker that dies fails its test and ends the run with "worker gwN crashed" (a replacement worker trips
# an internal error in xdist's loadfile scheduler instead).
PYTEST_XDIST := -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart=0

# schemathesis' generated cases do not go through test_rel_bad_input.py's recording hook under xdist (its
# test_schemathesis_covered_every_operation then fails): that module runs in a plain pytest of its own
# (in-process, no Ray, no ports). `make test` starts it beside the xdist run, where it fills the CPU time
# the workers leave while they wait on Ray and Serve (it took a minute alone after them); its output
# follows theirs, then both runs' counts added up (tests/_support/summary.py), and either one failing
# fails the target.
SERIAL_TESTS := tests/reliability/test_rel_bad_input.py

# Lint runs beside the tests as well, at nice 10: mypy is one process (~25 CPU-s from a cold cache), and run
# before the tests it left the second core idle for half a minute; beside them it takes the CPU time the
# test workers leave. Its output follows the tests'; a lint failure fails the target as before.
test: venv
	@log=$$(mktemp); xlog=$$(mktemp); lintlog=$$(mktemp); \
	nice -n 10 $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) lint > $$lintlog 2>&1 & lint=$$!; \
	$(BIN)/pytest -q -p no:cacheprovider $(SERIAL_TESTS) > $$log 2>&1 & serial=$$!; \
	trap 'kill $$serial $$lint 2>/dev/null' INT TERM; \
	echo "make lint  (beside the runs below; its output follows them)"; \
	echo "$(BIN)/pytest -q $(SERIAL_TESTS)  (beside the run below; its output follows)"; \
	echo "$(BIN)/pytest -q $(PYTEST_XDIST) --durations=25 --ignore=$(SERIAL_TESTS)"; \
	{ $(BIN)/pytest -q $(PYTEST_XDIST) --durations=25 --ignore=$(SERIAL_TESTS) 2>&1; echo $$? > $$xlog.rc; } \
		| tee $$xlog; rc=$$(cat $$xlog.rc); \
	wait $$serial; serial_rc=$$?; echo "--- $(SERIAL_TESTS) (run beside the above):"; cat $$log; \
	wait $$lint; lint_rc=$$?; echo "--- make lint (run beside the above):"; cat $$lintlog; \
	echo "--- make test: run 1 = the two-worker run, run 2 = $(SERIAL_TESTS)"; \
	$(BIN)/python tests/_support/summary.py $$xlog $$rc $$log $$serial_rc; \
	if [ $$lint_rc -eq 0 ]; then echo "lint: passed"; else echo "lint: FAILED (exit status $$lint_rc)"; fi; \
	rm -f $$log $$xlog $$xlog.rc $$lintlog; [ $$rc -eq 0 ] && [ $$serial_rc -eq 0 ] && [ $$lint_rc -eq 0 ]

# while you iterate: no lint, and the `slow` tests (real Ray clusters) deselected
test-fast: venv
	$(BIN)/pytest -q $(PYTEST_XDIST) -m "not gpu and not slow" --ignore=$(SERIAL_TESTS)
	$(BIN)/pytest -q -m "not gpu and not slow" $(SERIAL_TESTS)

# stages, times and losses only; `make demo ARGS=--verbose` adds Ray's logs and every step line
demo: venv
	$(BIN)/llmray demo $(ARGS)

gpu-test:
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
