# The two commands of the README. Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dareg demo --out demo_output

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra Testing

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_register.py
	$(BIN)/python benchmarks/bench_training.py

lint: $(STAMP)
	$(BIN)/ruff check DeepAbdominalRegistration Testing benchmarks scripts

clean:
	rm -rf $(VENV) demo_output bench_output
