# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# Re-install only when the project's dependencies, the kernel the install builds, or this file change.
STAMP := $(VENV)/.obcompress-installed

.PHONY: all install demo test bench clean

all: test

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned, so that installing the project (torch>=2.2) never pulls another build.
$(STAMP): pyproject.toml setup.py src/obcompress/solvers/_kernel.c Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/obcompress demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

bench: $(STAMP)
	$(BIN)/python benchmarks/solvers.py

clean:
	rm -rf $(VENV) build dist .pytest_cache src/*.egg-info src/obcompress/solvers/_kernel_lib*
