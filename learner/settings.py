"""Settings of the learner service (pydantic-settings; light module: no torch/deepspeed here).

Precedence: CLI flag (init kwargs) > environment (`TBRM_LEARNER_<FIELD>`, nested with `__`) > the `[learner]`
section of the run TOML named by `TBRM_RUN_CONFIG` > defaults. The shared variables `TBRM_REDIS_URL` and
`TBRM_AUTH_TOKEN` are read without the prefix.

Example run TOML::

    [learner]
    lr = 3e-5
    batch_size = 16
    push_interval_steps = 1
    [learner.loss]
    kind = "tbrm"
    beta = 0.002
    [learner.table]
    max_times_sampled = 1
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from buffer.schema import TableConfig
from common.files import toy_model_dir as default_model_dir
from common.settings import RunTomlSettings
from learner.loss_config import LossConfig, TbrmLossConfig
from learner.push import Fanout

DEFAULT_PORT = 8003


class ConstantSchedule(BaseModel):
    """lr(step) = lr * min(1, (step + 1) / warmup_steps)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["constant"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up from lr/warmup_steps to lr over this many optimizer steps."""


class CosineSchedule(BaseModel):
    """Linear warm-up, then lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress))) over decay_steps."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps before the cosine decay starts."""
    decay_steps: int | None = Field(default=None, ge=1)
    """Length of the cosine decay after warm-up; None = `max_steps - warmup_steps` (needs max_steps)."""
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Final lr as a fraction of `lr`."""


class PrioritySettings(BaseModel):
    """Replay priorities from the TBRM residual, written back after every step (learner/replay.py).

    p_i = |delta_i| + eps for each trained trajectory; a `prioritized` table sampler then draws P(i) ∝ p_i^alpha
    with alpha = `table.sampler.exponent`, and new items enter at the largest priority seen so far. With any
    other sampler nothing is written (the call would be wasted)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    """Write residual priorities when the table's sampler is `prioritized`."""
    eps: float = Field(default=1.0, gt=0)
    """Added to |delta| (in nats, like delta) so that a fitted trajectory keeps a small chance to be replayed."""


class GuardSettings(BaseModel):
    """The stability guard (learner/guard.py): non-finite steps are always skipped and never published; a
    blow-up (a residual or a log-ratio beyond its bound for `patience_steps` steps in a row) gets `response`."""

    model_config = ConfigDict(extra="forbid")
    max_residual_abs: float | None = Field(default=5e3, gt=0)
    """A batch whose largest |delta| exceeds this counts as a blow-up step (r/beta is 500 at the paper's beta and
    reward 1, so healthy residuals stay within a few times that). None = not checked."""
    max_log_ratio_incorrect: float | None = Field(default=50.0, gt=0)
    """A batch whose mean log pi(tau)/pi_ref(tau) over trajectories with reward <= 0 exceeds this counts as a
    blow-up step: at the optimum that log-ratio is strongly negative, so a large positive value means the policy
    piles probability onto wrong answers (the collapse seen at constant lr 1e-4: +200 on non-answers)."""
    patience_steps: int = Field(default=3, ge=1)
    """Consecutive blow-up steps before the guard responds (and the cool-down after a response)."""
    response: Literal["lr_backoff", "rollback", "warn"] = "rollback"
    """lr_backoff: multiply the lr by `lr_backoff_factor` for the rest of the run; rollback: also restore the last
    checkpoint (model, optimizer, scheduler; versions keep increasing) — lr_backoff alone before the first one;
    warn: only log."""
    lr_backoff_factor: float = Field(default=0.5, gt=0, lt=1)
    """Multiplier applied to the lr (its schedule's base) at each response."""


class LearnerSettings(RunTomlSettings):
    """Everything the learner needs: model, objective, optimizer, buffer, push and checkpoint cadence."""

    model_config = SettingsConfigDict(
        env_prefix="TBRM_LEARNER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )
    toml_section: ClassVar[str] = "learner"

    # ---- service ----
    host: str = "127.0.0.1"
    """Bind address of the status HTTP server (rank 0 only)."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """Port of the status HTTP server (0 = do not serve HTTP)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # ---- model and objective ----
    model_path: Path = Field(default_factory=default_model_dir)
    """HF folder of the initial policy (also the frozen reference model unless `ref_model_path` is set)."""
    ref_model_path: Path | None = None
    """HF folder of the frozen reference model; None = `model_path`."""
    loss: LossConfig = Field(default_factory=TbrmLossConfig)
    """Objective: `{"kind": "tbrm", "beta": ..., "calibrated": ...}`, `{"kind": "grpo", ...}` or `{"kind": "sft"}`."""
    seed: int = 0
    """Seeds python, numpy and torch RNGs at start (restored exactly on resume)."""

    # ---- optimizer ----
    lr: float = Field(default=3e-5, gt=0)
    """Peak learning rate of AdamW."""
    schedule: ConstantSchedule | CosineSchedule = Field(default_factory=ConstantSchedule, discriminator="kind")
    """Learning-rate schedule over optimizer steps."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value (None = no clipping). TBRM's residuals are large: keep it."""
    priorities: PrioritySettings = Field(default_factory=PrioritySettings)
    """Residual replay priorities written back to the buffer (used by a prioritized sampler)."""
    guard: GuardSettings = Field(default_factory=GuardSettings)
    """Skips non-finite steps and answers residual / log-ratio blow-ups (lr back-off, rollback)."""

    # ---- batches ----
    batch_size: int = Field(default=16, ge=1)
    """Trajectories per optimizer step (over all data-parallel ranks)."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Trajectories per forward/backward on one rank (gradient accumulation splits the batch into these; larger
    than the batch = one micro-batch)."""
    max_tokens_per_micro_batch: int | None = Field(default=None, ge=1)
    """Also split micro-batches so that rows * padded length stays under this (None = rows only)."""

    # ---- distributed / DeepSpeed ----
    zero_stage: int = Field(default=2, ge=0, le=3)
    """ZeRO stage when no `ds_config_path` is given (<= 2 exports weights from `engine.module.state_dict()`)."""
    ds_config_path: Path | None = None
    """A DeepSpeed JSON config (bf16, offload, ...). Batch-size and clipping keys are filled in from these settings."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the policy and reference models (float32 on CPU)."""
    autocast: Literal["none", "bfloat16", "auto"] = "none"
    """Mixed precision of the forward/backward (fp32 master weights and optimizer): "bfloat16" runs the matmuls in
    bf16 under `torch.autocast` (1.4x faster on CPUs with AVX512-BF16/AMX: bench-learner, smollm2); "auto" does so
    only where bf16 is native (CUDA, AVX512-BF16, AMX): an AVX2-only CPU emulates bf16, many times slower."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (less memory, about a third more compute; for large models)."""
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the pushed safetensors (must match the actors' model dtype); None = the training dtype."""
    torch_threads: int | None = Field(default=None, ge=1)
    """torch.set_num_threads for the learner process (None = torch's default)."""

    # ---- cadence ----
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (None = until stopped)."""
    push_interval_steps: int = Field(default=1, ge=1)
    """Export and push weights to the actors every K optimizer steps (forced to 1 in sync mode)."""
    checkpoint_interval_steps: int | None = Field(default=50, ge=1)
    """Save a resumable checkpoint every N steps (None = only at exit)."""
    ack_after_checkpoint: bool = True
    """Ack a trained batch only once a checkpoint holds its update (its lease is renewed until then), so a crash
    returns the batches since the last checkpoint to the buffer instead of losing them (learner/acks.py). Needs
    room in the table for checkpoint_interval_steps x batch_size leased trajectories. False, no periodic
    checkpoints, or replay (`table.max_times_sampled` != 1): ack right after the optimizer step. With replay an item
    stays in the table until its last ack anyway, so a crash costs it at most one of its passes, while held leases
    would keep items from being replayed (and starve the sampler under samples_per_insert > 1)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """How many checkpoints to keep in the run directory."""
    keep_weights: int = Field(default=3, ge=1)
    """How many exported safetensors versions to keep on disk (late actors catch up from the newest)."""
    resume: Literal["auto", "never", "must"] = "auto"
    """auto: resume if the run directory has a checkpoint; never: start fresh; must: fail without a checkpoint."""
    run_dir: Path = Path("runs/learner")
    """Run directory: metrics.jsonl, checkpoints/, weights/, tensorboard/."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers of the per-step metrics besides metrics.jsonl (learner/tracking.py): TensorBoard event
    files, W&B (offline unless WANDB_MODE is set), MLflow (file store beside them unless MLFLOW_TRACKING_URI is
    set); [] = none. wandb and mlflow are optional packages."""
    tensorboard_dir: Path | None = None
    """Where the TensorBoard event files go; None = `<run_dir>/tensorboard`."""

    # ---- buffer and cluster ----
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("redis_url", "TBRM_REDIS_URL", "TBRM_LEARNER_REDIS_URL"),
    )
    """Redis holding the replay table, actor registry and status (shared env `TBRM_REDIS_URL`)."""
    auth_token: str | None = Field(
        default=None, validation_alias=AliasChoices("auth_token", "TBRM_AUTH_TOKEN", "TBRM_LEARNER_AUTH_TOKEN")
    )
    """Bearer token sent with weight pushes (shared env `TBRM_AUTH_TOKEN`)."""
    table: TableConfig | None = None
    """Config of the replay table; None = adopt the config stored in Redis by whoever created the table (the
    buffer, an actor), or the default table if none exists yet. A different stored config is an error."""
    sample_timeout_s: float = Field(default=5.0, gt=0)
    """How long one `sample` call waits for the rate limiter before the loop logs, catches up actors that joined
    meanwhile, and retries."""
    lease_s: float | None = Field(default=None, gt=0)
    """Lease on sampled items (None = the table's `lease_s`). Async mode leases each batch one step ahead and renews
    it when its step starts, so this must comfortably exceed two steps (and the longest stall)."""
    push_timeout_s: float = Field(default=60.0, gt=0)
    """Timeout of one weight push to one actor."""
    push_retry_s: float = Field(default=5.0, ge=0)
    """After a failed push, wait this long before trying that actor again."""
    push_workers: int = Field(default=8, ge=1)
    """Concurrent pushes (one per actor)."""
    push_fanout: Fanout = "auto"
    """How a version reaches many actors (learner.push `Fanout`; docs/weight-protocol.md#fan-out): "direct" sends
    the file once per actor, "relay" once down a chain of the actors (one the chain misses gets a direct push),
    "auto" relays when more than two actors are due."""
    canary_max_drift: float = Field(default=0.05, gt=0)
    """Verified delivery: largest |log-prob difference| on the canary sequence between an actor (after applying a
    version) and the learner (same version) before a warning is logged and `canary_alarms` counted. Raise it when
    the actors run a lower-precision dtype than training (their kernels round differently)."""
    sync: bool = False
    """Synchronous on-policy mode (the baseline of the async comparison): push every step and train only on
    trajectories generated by the current weights (see learner/README.md)."""

    @model_validator(mode="after")
    def _check(self) -> LearnerSettings:
        if isinstance(self.schedule, CosineSchedule) and self.schedule.decay_steps is None and not self.max_steps:
            raise ValueError("a cosine schedule needs schedule.decay_steps or max_steps")
        return self
