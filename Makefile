# Two commands for a new user: `make demo` (a real tiny MoE run on the CPU) and `make test`.
# Both create .venv on first use (pinned torch/megatron-core) and re-use it afterwards.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A local directory of wheels (CI machines keep the torch CPU wheel there); used when present.
WHEELS ?= /opt/wheels
PIP_FLAGS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)

.PHONY: demo compare-tiny test test-fast lint install clean

install: $(STAMP)

# Python caches a module's bytecode the first time it is imported, so only the modules a run uses are
# compiled (pip would compile all ~19k files of the venv, ~1.5 min on 2 cores), even where the
# environment asks Python not to write bytecode.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, by pip, which finds the CPU wheel in $(WHEELS), so nothing can pull a
	# multi-GB CUDA build instead; uv then resolves and installs the rest (50 s instead of pip's 170 s).
	$(PY) -m pip install -q --no-compile $(PIP_FLAGS) torch==2.13.0 uv==0.13.9
	$(VENV)/bin/uv pip install -q --python $(PY) --constraint constraints.txt -e ".[dev]" \
		|| $(PY) -m pip install -q $(PIP_FLAGS) --constraint constraints.txt -e ".[dev]"  # uv failed: pip
	touch $(STAMP)

# A fresh run each time (runs/demo is replaced); the tokenizer and datasets stay cached in .cache.
demo: $(STAMP)
	rm -rf runs/demo
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) pretrain_moe.py --config configs/tiny-cpu.yaml \
		--set checkpoint.save=runs/demo/checkpoints --set logging.output_dir=runs/demo

# The paper's comparison at tiny size (docs/experiments.md): a dense base of 300 steps, then
# scratch, naive, Drop-Upcycling r=0.5 and r=1.0 for 400 steps each (16 x 128 tokens a step), then
# routing by domain and the report: 17 min on 2 cores (docs/benchmarks.md). Resumable: rerunning
# skips finished stages.
compare-tiny: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m megatron_ext.cli.compare_inits \
		--config configs/tiny-cpu.yaml --methods scratch,naive,drop:0.5,drop:1.0 \
		--train-dense 614400 --tokens 819200 --output runs/compare-tiny

# Two pytest workers, one test file each at a time (--dist loadfile keeps a module's fixtures,
# e.g. the SLURM daemons, on one worker), the longest files first (tests/scheduling.py).
# Measured 2026-12-07 on a fresh clone, 2 cores: 18 min of pytest (1.7 cores busy), 19 min with
# creating the venv (docs/benchmarks.md). Most of it is process start-up (~4 s of CPU per process
# importing torch and megatron-core), which tests/forkrun.py pays once for several tool runs and ranks.
test: lint
	$(PY) -m pytest -q -rs --timeout=900 -n 2 --dist loadfile --no-loadscope-reorder tests

# ruff (rules in pyproject.toml) and the import layers (import-linter contract in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test-fast: $(STAMP)
	$(PY) -m pytest -q -rs tests/unit

clean:
	rm -rf runs .cache .pytest_cache
