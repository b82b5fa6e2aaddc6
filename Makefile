# `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct
# The CPU wheel; a bare "torch" would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: install serve test pull proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ./client -e '.[test]'
	touch $@

pull: install
	$(BIN)/tokenwire-server pull $(MODEL)

serve: pull
	$(BIN)/tokenwire-server serve --model $(MODEL)

test: pull
	$(BIN)/python -m pytest

# Regenerate client/tokenwire/v1 from protos/ (a test fails when it is stale).
proto: install
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build *.egg-info server/*.egg-info client/*.egg-info
