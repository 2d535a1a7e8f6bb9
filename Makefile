# The README's two commands: `make demo` and `make test`. PYTHON is the interpreter to install into and run
# with; by default the project's own virtual environment `.venv`, created on first use (never activated, so
# nothing depends on PATH). `make test PYTHON=/path/to/python` uses another environment.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python

.PHONY: install demo test lint format

install:
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ] && [ ! -x "$(PYTHON)" ]; then \
		echo "creating the virtual environment $(VENV)"; python3 -m venv "$(VENV)"; fi
	$(PYTHON) -m pip install -e ".[dev]"
	# The reference scGPT, for the parity tests and the benchmark: its model module only (its own deps do not resolve).
	$(PYTHON) -m pip install --no-deps "scgpt==0.2.4"

demo: install
	$(PYTHON) -m jobs.demo

test: install
	$(PYTHON) -m pytest tests --durations=25

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
