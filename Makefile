# Quick start: `make demo` and `make test` each set up everything they need on a fresh machine.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
# torch 2.13.0: our machines' wheel cache serves its CPU build. Elsewhere PyPI's Linux wheel is
# the multi-GB CUDA build: `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes
# the CPU build from PyTorch's index instead.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: demo test bench viz-dot clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

# Graphviz's `dot` renders pictures; install it where we may, else say how.
viz-dot:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q graphviz >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q graphviz >/dev/null)); \
	  else echo "Graphviz's 'dot' is missing: install it (apt-get install graphviz, brew install graphviz)"; exit 1; fi; }

demo: $(VENV)/.installed viz-dot
	$(BIN)/python -m seqgraph demo

test: $(VENV)/.installed viz-dot
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python -m seqgraph bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
