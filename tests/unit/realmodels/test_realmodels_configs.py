"""The real-model run configs resolve exactly as the cluster resolves them and validate against every service's
settings class (`extra="forbid"`: a field a service does not know fails here, not on a GPU box hours later).

GPU configs go through `deploy.prepare.resolve_to` (the compose/k8s path: the file used whole); the CPU SmolLM2
config through `deploy.run_config.resolve` merged over configs/toy.toml (the `tbrm up --config` path)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from deploy import prepare, topology
from deploy.run_config import dump_toml, resolve

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs"
GPU_CONFIGS = {
    "qwen2.5-math-1.5b.toml": {"n": 4, "lr": 2.5e-6},
    "qwen2.5-math-1.5b-n1.toml": {"n": 1, "lr": 2.5e-6},
    "qwen2.5-math-7b.toml": {"n": 4, "lr": 2.5e-6},
    "qwen2.5-math-7b-n1.toml": {"n": 1, "lr": 2e-6},
}
IMAGE_ROOT = "/app/"  # the images COPY the repository's configs/ to /app/configs (deploy/docker/Dockerfile*)


def services(resolved: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Every service's settings object, built from the resolved file as the services build them."""
    from actor_service.settings import ActorSettings
    from buffer.settings import BufferSettings
    from learner.settings import LearnerSettings
    from reward.settings import RewardSettings

    for var in [k for k in os.environ if k.startswith("TBRM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv(topology.ENV_RUN_CONFIG, str(resolved))
    return {"actor": ActorSettings(), "learner": LearnerSettings(), "buffer": BufferSettings(),
            "reward": RewardSettings()}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_config_validates_and_has_the_paper_hyperparameters(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run.toml"
    run, data = prepare.resolve_to(CONFIGS / name, out)
    s = services(out, monkeypatch)
    actor, learner = s["actor"], s["learner"]
    want = GPU_CONFIGS[name]
    size = "7B" if "7b" in name else "1.5B"

    # the paper's recipe (docs/loss.md; issue: beta 0.002, 128 prompts/step, T = 1.0, 2048 response tokens, bf16)
    assert learner.loss.kind == "tbrm" and learner.loss.beta == 0.002 and not learner.loss.calibrated
    assert learner.lr == want["lr"]
    assert actor.n_samples_per_prompt == want["n"]
    assert learner.batch_size == 128 * want["n"]  # 128 prompts x n rollouts per optimizer step
    assert actor.prompts_per_batch == 128
    assert actor.temperature == 1.0 and actor.top_p == 1.0
    assert actor.max_tokens == 2048 and actor.max_model_len >= 2048 + 512
    assert actor.dtype == learner.dtype == learner.export_dtype == "bfloat16"
    assert learner.batch_size % learner.micro_batch_size == 0
    assert learner.max_steps == run.steps

    # the replay table agrees everywhere and a full batch can be sampled
    assert actor.table == learner.table == s["buffer"].table
    assert actor.table.rate_limiter.min_size_to_sample == learner.batch_size <= actor.table.max_size
    assert actor.table.max_times_sampled == 1

    # models where the compose gpu profile mounts them; the same model for actors and learner
    assert str(actor.model_dir) == str(learner.model_path) == f"/var/lib/tbrm/models/Qwen2.5-Math-{size}"
    assert run.dataset.startswith("/var/lib/tbrm/data/") and run.test_dataset.startswith("/var/lib/tbrm/data/")

    # ZeRO: the DeepSpeed JSON exists in the repository (the image path maps to it), bf16, stage <= 2 (the
    # learner exports weights from the full parameters)
    ds_path = str(learner.ds_config_path)
    assert ds_path.startswith(IMAGE_ROOT)
    ds = json.loads((REPO / ds_path.removeprefix(IMAGE_ROOT)).read_text())
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == learner.zero_stage == 2
    # vLLM on a GPU: an explicit KV budget that leaves the weights room on an 80 GB card
    assert actor.kv_cache_bytes is not None and actor.kv_cache_bytes <= 48 * 2**30
    assert not actor.enforce_eager


def test_the_learner_builds_its_deepspeed_config_from_the_gpu_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The learner's own config builder on each JSON, then DeepSpeed's config parser (no GPU needed)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from learner.engine import deepspeed_config

    for name in GPU_CONFIGS:
        out = tmp_path / name
        prepare.resolve_to(CONFIGS / name, out)
        learner = services(out, monkeypatch)["learner"]
        learner = learner.model_copy(
            update={"ds_config_path": REPO / str(learner.ds_config_path).removeprefix(IMAGE_ROOT)}
        )
        cfg = deepspeed_config(learner, world_size=1)
        assert cfg["train_micro_batch_size_per_gpu"] == learner.micro_batch_size
        assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"]
        zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])
        assert zero.stage == 2
        if "7b" in name:
            assert zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu"


def test_compose_gpu_default_is_the_1_5b_config() -> None:
    compose = (REPO / "docker-compose.yml").read_text()
    assert "./configs/qwen2.5-math-1.5b.toml" in compose
    assert (CONFIGS / "qwen2.5-math-1.5b.toml").exists()


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_configs_mean_the_same_under_tbrm_up(name: str, tmp_path: Path) -> None:
    """`tbrm up --config` merges over toy.toml: no toy value may leak into a service section of the paper config."""
    _, whole = resolve(CONFIGS / name, base_file=None)
    _, merged = resolve(CONFIGS / name)
    for sec in ("actor", "learner", "buffer", "reward"):
        assert merged[sec] == whole[sec], sec


def test_unknown_fields_fail_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a misspelt field in a copy of a real config is rejected by its service."""
    from pydantic import ValidationError

    data = tomllib.loads((CONFIGS / "qwen2.5-math-1.5b.toml").read_text())
    data["actor"]["max_new_tokens"] = 2048  # the actor's field is max_tokens
    bad = tmp_path / "bad.toml"
    bad.write_text(dump_toml(data))
    out = tmp_path / "run.toml"
    prepare.resolve_to(bad, out)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        services(out, monkeypatch)


def test_smollm2_cpu_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, data = resolve(CONFIGS / "smollm2-cpu.toml")
    out = tmp_path / "run.toml"
    out.write_text(dump_toml(data))
    s = services(out, monkeypatch)
    actor, learner = s["actor"], s["learner"]
    # the warmed-up model (`tbrm sft`, README "Real model on CPU") for both, with the system prompt it was tuned on
    assert str(actor.model_dir) == str(learner.model_path) == ".cache/smollm2-sft"
    assert actor.dtype == learner.dtype == "float32"  # CPU: fp32 weights, bf16 matmuls under autocast
    assert learner.autocast == "auto"  # bf16 only where native (AVX512-BF16, AMX, CUDA)
    assert learner.loss.kind == "tbrm" and learner.loss.beta == 0.002
    assert learner.batch_size == actor.prompts_per_batch * actor.n_samples_per_prompt
    assert actor.table == learner.table
    assert actor.kv_cache_bytes is not None and actor.max_tokens < actor.max_model_len
    assert run.dataset == "toy" and run.minutes == 30 and run.eval_max_tokens >= 32
    assert (run.toy_digits, run.toy_ops, run.toy_test_size) == (1, "+-*", 100)
    assert run.actor_threads + run.learner_threads == 2  # the 2-core split
    assert "\\boxed{" in actor.system_prompt  # the grader only reads boxed answers
    held = learner.checkpoint_interval_steps * learner.batch_size
    assert held <= learner.table.max_size // 2  # leased until their checkpoint
