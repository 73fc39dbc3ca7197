# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BASE := $(VENV)/.base

.PHONY: demo test benchmarks clean

# The demo needs bingo alone; the tests also need the test tools and the
# Lightning and Transformers extras (their integrations are tested for real).
$(BASE): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(BASE)
	$(VENV)/bin/bingo demo

test: $(STAMP)
	$(PY) -m pytest -q

# Regenerates BENCHMARKS.md from a real `bingo compare` run (minutes; resumes if interrupted).
benchmarks: $(STAMP)
	$(PY) benchmarks/fashion_mnist.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
