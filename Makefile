# The two commands in README: `make demo` and `make test`. Each creates .venv if missing and installs into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU torch first (a file on this project's machines); a GPU cluster's env brings its own CUDA build.
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers: three on this project's 2-core machines, where they keep both cores busy (two left a fifth of
# the CPU idle while tests wait on timeouts, restarts and the SLURM cluster); a module's tests stay on one worker
# (tests/conftest.py). WORKERS=0 runs in one process.
WORKERS ?= 3
XDIST   := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadscope)
# The inner loop: no training launches, no ranks, no cluster.
QUICK   := not slow and not distributed and not slurm

export SHM_OP := from pretrain.libraries import lighten_imports; lighten_imports(); \
	from deepspeed.comm.torch import build_shm_op; build_shm_op()

.PHONY: demo test check coverage install clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# On a CPU-only host DeepSpeed JIT-compiles its shared-memory comm op (about 30 s) at the first
	# init_distributed of every new environment; build it here, once, into the environment's own cache
	# (pretrain/libraries.py; a no-op where CUDA is DeepSpeed's accelerator).
	$(BIN)/python -c "$$SHM_OP" > /dev/null 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pretrain.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# Unit tests only (under 3 minutes): run it while you work, `make test` before you push.
check: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "$(QUICK)" $(PYTEST_ARGS)

# The whole suite under coverage.py, every child process included; report in the terminal and .coverage/html
# (also when a test failed: the exit status is the tests').
coverage: $(STAMP)
	rm -rf .coverage && mkdir .coverage
	$(BIN)/python -m coverage run -m pytest $(XDIST) $(PYTEST_ARGS); status=$$?; \
	$(BIN)/python -m coverage combine -q && $(BIN)/python -m coverage report && \
	$(BIN)/python -m coverage html -q -d .coverage/html; exit $$status

# On a machine with one CUDA GPU and the project installed in .venv with a CUDA torch (e.g. TORCH=torch):
# GPU tests, kernel timings, the 125m and 1b presets as shipped beside the transformers peer (about 6 minutes).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs/demo
