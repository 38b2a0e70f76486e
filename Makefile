# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# One thread per process: measured 10x faster than oversubscribed threads on the 2-core CI box.
export OMP_NUM_THREADS ?= 2

.PHONY: train test lint bench clean-venv gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.venv: $(VENV)/.installed

# A usable model in about two minutes: checkpoints (step 50 and the last), val_loss on the built-in
# validation split, then a sample from the last checkpoint and the commands to go on with.
TRAIN_RUN := outputs/llama3_debug
train: .venv
	$(VENV)/bin/lockstep train --config llama3_debug --checkpoint.enable --checkpoint.interval 50 \
		--validation.enable --validation.freq 50 --validation.steps 4
	$(VENV)/bin/lockstep generate $(TRAIN_RUN) --prompt "The " --max-new-tokens 40 --greedy
	@echo
	@echo "next: .venv/bin/lockstep eval $(TRAIN_RUN)"
	@echo "      .venv/bin/lockstep generate $(TRAIN_RUN) --prompt 'def ' --max-new-tokens 60"
	@echo "      .venv/bin/lockstep convert to-hf $(TRAIN_RUN) hf-export   # transformers, vLLM, lm-eval"
	@echo "      .venv/bin/lockstep compare $(TRAIN_RUN) OTHER_RUN"

test: .venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 3 --dist worksteal  # three test processes: ranks start up and wait in collectives, a third keeps both cores busy

# On a lent GPU machine: its own python and torch, no venv, nothing from the network (benchmarks/gpu_acceptance.py).
GPU_OUT ?= gpu-results
gpu-check:
	$(PYTHON) benchmarks/gpu_acceptance.py $(GPU_OUT)

lint: .venv
	$(VENV)/bin/ruff check lockstep tests benchmarks
	$(VENV)/bin/ruff format --check lockstep tests benchmarks

bench: .venv
	$(PY) benchmarks/throughput.py
