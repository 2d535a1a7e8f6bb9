# The README's two commands: `make demo` and `make test`. PYTHON is the interpreter to install into
# (default: the current environment's python3; use `make demo PYTHON=.venv/bin/python` for a venv).
PYTHON ?= python3

.PHONY: install demo test lint format

install:
	$(PYTHON) -m pip install -e ".[dev]"
	# The reference scGPT, for the parity tests and the benchmark: its model module only (its own deps do not resolve).
	$(PYTHON) -m pip install --no-deps "scgpt==0.2.4"

demo: install
	$(PYTHON) -m jobs.demo

test: install
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
