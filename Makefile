# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The pinned torch takes the local CPU wheel on our machines; elsewhere override TORCH= to keep your own build.
TORCH ?= torch==2.13.0

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/critlayer scan smollm2-135m --out critlayer-demo --force

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) critlayer-demo
