"""Wire and storage schema of the replay buffer (owned by `buffer`, imported by actors and the learner).

Light module: pydantic only. Every process that talks to the buffer agrees on these types.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
"""Bumped on any incompatible change of `Trajectory`; stored with every item."""

GradeStatus = Literal["correct", "incorrect", "no_answer", "timeout", "error"]


def new_id() -> str:
    return uuid.uuid4().hex


class Prompt(BaseModel):
    """One training or evaluation problem, as it sits in the prompt queue."""

    model_config = ConfigDict(extra="forbid")

    prompt_id: str = Field(min_length=1, max_length=200)
    """Stable id of the problem (unique within a dataset)."""
    messages: list[dict[str, str]] = Field(min_length=1)
    """Chat messages (`{"role": ..., "content": ...}`) before the chat template is applied."""
    gold: str = Field(max_length=10_000)
    """Ground-truth final answer (what the reward service compares against)."""
    data_source: str = "unknown"
    epoch: int = Field(default=0, ge=0)
    """Pass over the dataset this copy belongs to (set by the prompt queue)."""


class Trajectory(BaseModel):
    """One sampled response to one prompt, graded, tagged with the policy version that generated it."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    traj_id: str = Field(default_factory=new_id)
    prompt_id: str
    group_id: str
    """All n samples of one prompt in one actor batch share a group id (GRPO groups by it)."""
    prompt_token_ids: list[int] = Field(min_length=1)
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    """log pi_behaviour(a_h | s_h) of each sampled response token, as the actor's engine computed it."""
    prompt_text: str = ""
    response_text: str = ""
    finish_reason: str = "stop"
    reward: float
    grade_status: GradeStatus
    extracted: str | None = None
    gold: str = ""
    data_source: str = "unknown"
    policy_version: int = Field(ge=0)
    """Weights version when generation started."""
    policy_version_end: int | None = None
    """Weights version when generation ended (differs from `policy_version` if a push landed mid-batch)."""
    actor_id: str = ""
    created_at: float = Field(default_factory=time.time)
    gen_latency_s: float = 0.0
    grade_latency_s: float = 0.0
    ref_logprobs: list[float] | None = None
    """Cached reference-model log-probs of the response tokens (filled by the learner on first use)."""
    ref_v0: float | None = None
    """Cached V_ref(s_1) = logsumexp of the reference logits at the last prompt position (calibrated TBRM)."""

    @model_validator(mode="after")
    def _lengths_match(self) -> Trajectory:
        n = len(self.response_token_ids)
        if len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"behaviour_logprobs has {len(self.behaviour_logprobs)} entries for {n} response tokens"
            )
        if self.ref_logprobs is not None and len(self.ref_logprobs) != n:
            raise ValueError(f"ref_logprobs has {len(self.ref_logprobs)} entries for {n} response tokens")
        return self


class SampleInfo(BaseModel):
    """Metadata returned with every sampled item."""

    item_id: str
    times_sampled: int
    """Times this item has been handed out, this sample included."""
    age_versions: int
    """learner_version - trajectory.policy_version at sampling time."""
    priority: float = 1.0
    probability: float = 1.0
    """Probability with which the sampler picked this item (for importance correction, if wanted)."""
    buffer_size: int
    inserted_at: float


class SampledItem(BaseModel):
    info: SampleInfo
    trajectory: Trajectory


class SampleBatch(BaseModel):
    lease_id: str
    lease_expires_at: float
    items: list[SampledItem]


# ---- table configuration: samplers are a discriminated union, not a string switch ----


class FifoSampler(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["fifo"] = "fifo"


class LifoSampler(BaseModel):
    """Newest available first: with reuse (`max_times_sampled` > 1) a trajectory is replayed while it is still
    fresh, a step or two after its first use, instead of after everything older (fifo)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["lifo"] = "lifo"


class UniformSampler(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["uniform"] = "uniform"


class PrioritizedSampler(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["prioritized"] = "prioritized"
    exponent: float = Field(default=0.6, ge=0.0, le=10.0)
    """P(i) = p_i^exponent / sum_j p_j^exponent."""


Sampler = Annotated[
    FifoSampler | LifoSampler | UniformSampler | PrioritizedSampler, Field(discriminator="kind")
]


class RateLimiterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_size_to_sample: int = Field(default=1, ge=1)
    """Sampling blocks until the table holds at least this many items."""
    samples_per_insert: float | None = Field(default=None, gt=0)
    """Target ratio of sampled items to inserted items; None disables the ratio limit."""
    error_buffer: float = Field(default=100.0, ge=0)
    """Allowed deviation (in items) from samples_per_insert before a side blocks."""


class StorageConfig(BaseModel):
    """How the table encodes each trajectory in Redis (`buffer.codec`, format 3). Token ids are always exact."""

    model_config = ConfigDict(extra="forbid")
    compress_token_ids: bool = True
    """zlib (level 1) of the byte-planes of the packed ids: ~40% fewer bytes on real text for ~10 us of decoding
    per 1K ids when a batch is read (arrays are then no longer zero-copy views)."""
    logprob_dtype: Literal["float32", "float16"] = "float32"
    """float32 is exact for what vLLM and torch compute; float16 halves the log-probs (lossy: relative error up to
    2^-11, about 3 significant digits; |log-prob| below 6e-8 becomes 0, below -65504 -inf)."""
    store_texts: bool = True
    """False: prompt_text / response_text are not stored (read back as ""); the token ids carry the same content
    (the tokenizer decodes them) and the learner never reads the texts, only the REST views and exports do."""


class TableConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="replay", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    max_size: int = Field(default=100_000, ge=1)
    sampler: Sampler = Field(default_factory=FifoSampler)
    remover: Literal["fifo"] = "fifo"
    max_times_sampled: int = Field(default=1, ge=0)
    """An item is removed after being acked this many times; 0 = unlimited."""
    max_staleness_versions: int | None = Field(default=None, ge=0)
    """Drop items with learner_version - policy_version above this at sample time; None = keep all."""
    rate_limiter: RateLimiterConfig = Field(default_factory=RateLimiterConfig)
    lease_s: float = Field(default=300.0, gt=0)
    """Sampled-but-unacked items return to the table after this many seconds."""
    memory_limit_bytes: int | None = Field(default=None, ge=1)
    """Inserts wait (then raise BufferFull) while Redis's used_memory is at or above this; None = 90% of Redis's
    maxmemory when one is set (set maxmemory below the container limit), else no guard."""
    remember_removed_ids: int = Field(default=1_000_000, ge=0)
    """How many ids of removed items (consumed, evicted, dropped) the table remembers, newest first, so that a
    retried insert of one is a no-op instead of a second training (about 100 bytes of Redis memory each)."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Encoding of the stored items (memory vs fidelity); see docs/buffer-internals.md for the bytes per item."""


class TableStats(BaseModel):
    name: str
    size: int
    max_size: int
    inserts: int
    samples: int
    acks: int
    removed: int
    """Removed by the fifo remover (table full)."""
    dropped_stale: int
    leased: int
    """Items currently out on a lease."""
    consumed: int = 0
    """Removed after being acked max_times_sampled times (inserts = size + consumed + removed + dropped_stale)."""
    removed_unsampled: int = 0
    """Items that left the table (fifo remover or staleness drop) without ever being sampled: never trained."""
    sampled_distinct: int = 0
    """Items handed out by sample at least once (samples / sampled_distinct = mean reuse of a sampled item)."""
    extra: dict[str, Any] = Field(default_factory=dict)


# ---- registry and status records ----


class ActorInfo(BaseModel):
    actor_id: str
    url: str
    """Base URL where the actor serves /v1/weights."""
    policy_version: int = 0
    last_heartbeat: float = Field(default_factory=time.time)
    started_at: float = Field(default_factory=time.time)
    tokens_per_s: float = 0.0
    trajectories: int = 0
    status: str = "running"


class WeightsInfo(BaseModel):
    version: int = Field(ge=0)
    sha256: str
    nbytes: int = Field(ge=0)
    path: str | None = None
    """Where the learner keeps this safetensors file (for catching up late actors)."""
    created_at: float = Field(default_factory=time.time)


class LearnerStatus(BaseModel):
    step: int = 0
    policy_version: int = 0
    updated_at: float = Field(default_factory=time.time)
    metrics: dict[str, float] = Field(default_factory=dict)
    state: str = "running"
