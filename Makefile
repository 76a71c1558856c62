# Two commands a new user needs: `make demo` (set up .venv, train the tiny preset on the embedded
# corpus with JAX) and `make test` (the whole test suite). Everything runs on a CPU-only machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast gpu-check clean

$(VENV)/.installed: pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) train_jax.py

test: install
	$(PY) -m pytest -q -ra tests

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
