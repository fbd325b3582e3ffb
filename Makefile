# Two commands for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
# torch is pinned: on machines with a local CPU wheel of this version pip takes it; elsewhere the
# normal build comes from PyPI. Override with `make TORCH_VERSION=...`.
TORCH_VERSION ?= 2.13.0

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[train,dev]"
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash launch/demo.sh

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) runs .pytest_cache
