# `make demo` and `make test` do all the set-up a fresh clone needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench-test bench bench-instructions bench-instructions-mlp bench-instructions-frameworks bench-frameworks install clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) requirements-dev.txt pyproject.toml
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps torcheck || echo "torcheck not installed: its benchmark column will be empty"
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m modeguard demo

test: $(STAMP)
	$(PY) -m pytest -q

# The tests marked `bench` (one real callgrind measurement; about a minute), which
# `make test` leaves out. Skipped where valgrind is not installed.
bench-test: $(STAMP)
	$(PY) -m pytest -q -m bench

bench: $(STAMP)
	$(PY) -m benchmarks

# Deterministic companion to `make bench`: the MLP's setups (about 10 minutes on 2 cores),
# then the training step inside Lightning and the Hugging Face Trainer (about 25 minutes
# more: the frameworks' imports run under valgrind too). Needs valgrind.
bench-instructions: bench-instructions-mlp bench-instructions-frameworks

bench-instructions-mlp: $(STAMP)
	$(PY) -m benchmarks.instructions --json benchmarks/results/instructions.json --markdown benchmarks/results/instructions.md

bench-instructions-frameworks: $(STAMP)
	$(PY) -m benchmarks.instructions --only lightning,hf --steps 32 --seeds 3 --json benchmarks/results/instructions-frameworks.json --markdown benchmarks/results/instructions-frameworks.md

# Their step time (each setup in fresh processes, five rounds) and function calls per step
# (about 10 minutes on 2 cores; run it on a quiet machine).
bench-frameworks: $(STAMP)
	$(PY) -m benchmarks.frameworks --json benchmarks/results/frameworks.json --markdown benchmarks/results/frameworks.md

clean:
	rm -rf $(VENV) build *.egg-info
