"""Settings of the reward service (light module: pydantic only).

Precedence: CLI flag > environment (``TBRM_REWARD_*``; nested: ``TBRM_REWARD_SCORES__INCORRECT=-1``) >
the ``[reward]`` section of the run TOML named by ``TBRM_RUN_CONFIG`` > defaults.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import RunTomlSettings


class ScoreMap(BaseModel):
    """Score given for each grading status (e.g. 1/0/0 or 1/-1/-1)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    correct: float = 1.0
    """Score of a response whose final answer matches the gold answer."""
    incorrect: float = 0.0
    """Score of a response with a final answer that does not match."""
    no_answer: float = 0.0
    """Score of a response without a (unique, closed) final answer."""
    timeout: float = 0.0
    """Score when verification ran out of time (pathological or very hard input)."""
    error: float = 0.0
    """Score when the grader failed internally."""

    def score(self, status: str) -> float:
        return float(getattr(self, status))


class RewardSettings(RunTomlSettings):
    """Configuration of the reward service (`python -m reward`)."""

    model_config = SettingsConfigDict(env_prefix="TBRM_REWARD_", env_nested_delimiter="__", extra="forbid",
                                      use_attribute_docstrings=True)
    toml_section: ClassVar[str] = "reward"

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = Field(8001, ge=1, le=65535)
    """TCP port (the reward service listens on 8001 by default)."""
    workers: int = Field(2, ge=1, le=64)
    """math-verify worker processes (each grades one pair at a time on its main thread)."""
    soft_timeout_s: float = Field(3.0, gt=0)
    """Time limit of one math-verify comparison, enforced inside the worker (answers `timeout`)."""
    hard_timeout_s: float = Field(6.0, gt=0)
    """Supervisor limit: a worker silent this long is SIGKILLed and replaced; the item answers `timeout`."""
    worker_memory_mb: int = Field(1024, ge=0)
    """Address-space limit (RLIMIT_AS) of each worker in MiB; 0 disables it."""
    max_answer_chars: int = Field(1000, ge=10)
    """Extracted answers longer than this never reach sympy (string equality still counts)."""
    cache_size: int = Field(100_000, ge=0)
    """Entries of the (sha256(response), gold) -> verdict LRU cache; 0 disables it."""
    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    """Largest accepted request body (413 above it)."""
    scores: ScoreMap = Field(default_factory=ScoreMap)
    """Score per status."""
    log_level: str = "INFO"
    """Python logging level."""

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> RewardSettings:
        if self.hard_timeout_s <= self.soft_timeout_s:
            raise ValueError(
                f"hard_timeout_s ({self.hard_timeout_s}) must be greater than soft_timeout_s ({self.soft_timeout_s})"
            )
        return self
