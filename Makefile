# Two commands for a fresh machine: `make demo` and `make test` (`make test-fast`: the quick tier).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
# The evaluator's light install: `pip install .` without extras (no torch); the light tests verify with it.
LIGHT  ?= .venv-light
# torch is pinned: on machines with a local CPU wheel of this version pip takes it; elsewhere the
# normal build comes from PyPI. Override with `make TORCH_VERSION=...`.
TORCH_VERSION ?= 2.13.0
# pytest workers (pytest-xdist): one per core by default; JOBS=0 runs the suite in one process.
JOBS ?= auto

.PHONY: demo test test-fast test-light bench-smoke lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[train,dev]"
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash launch/demo.sh

# The whole suite, the light-install tier included (it reuses the session's trained demo bundle).
test: install $(LIGHT)/.installed
	PATH="$(abspath $(BIN)):$$PATH" KAI_LIGHT_VENV="$(abspath $(LIGHT))" $(BIN)/python -m pytest -q -ra -m "not bench" -n $(JOBS)

# The edit-test loop: everything but the real torchrun/DeepSpeed trainings (about two minutes).
test-fast: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -ra -m "not slow" -n $(JOBS)

# The smoke sizes of the benches that train (torchrun/DeepSpeed; the others run in `make test`).
bench-smoke: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -ra -m bench tests/test_bench_smoke.py

# ruff (style and bug patterns), the layer contracts (import-linter, [tool.importlinter]) and mypy, all
# configured in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# Rebuilt when the packaging or any installed source changes (a non-editable install copies them).
$(LIGHT)/.installed: pyproject.toml Makefile $(wildcard attest/*.py attest/*/*.py attest/*/*/*.py kai_train/*.py kai_train/conf/*.py kai_train/conf/*.yaml kai_train/conf/*/*.yaml data_pipelines/*.py)
	test -x $(LIGHT)/bin/python || $(PYTHON) -m venv $(LIGHT)
	$(LIGHT)/bin/pip install -q .
	$(LIGHT)/bin/pip install -q --no-deps --force-reinstall .
	@! $(LIGHT)/bin/python -c "import torch" 2>/dev/null || { echo "$(LIGHT): torch got installed; the light install must not need it"; exit 1; }
	touch $@

# The torch-free tier alone: the main venv trains a demo bundle, the light venv verifies it (tests -m light);
# then the quick tier runs on the light install itself (pytest added to it): tests that need the train
# extra skip themselves there.
test-light: install $(LIGHT)/.installed
	PATH="$(abspath $(BIN)):$$PATH" KAI_LIGHT_VENV="$(abspath $(LIGHT))" $(BIN)/python -m pytest -q -ra -m light
	$(LIGHT)/bin/pip install -q pytest hypothesis
	$(LIGHT)/bin/python -m pytest -q -ra -m "not slow" -p no:cacheprovider

clean:
	rm -rf $(VENV) $(LIGHT) build runs .pytest_cache
