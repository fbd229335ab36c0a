# The two commands in README: `make demo` and `make test`. Each creates .venv if missing and installs into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU torch first (a file on this project's machines); a GPU cluster's env brings its own CUDA build.
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pretrain.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# On a machine with one CUDA GPU and the project installed in .venv with a CUDA torch (e.g. TORCH=torch):
# GPU tests, kernel timings, the 125m and 1b presets as shipped beside the transformers peer (about 6 minutes).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs/demo
