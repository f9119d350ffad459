"""Settings of the buffer API service (light module: pydantic only).

Precedence: command line (`python -m buffer --help`; pydantic-settings' CLI, dotted names for nested fields) >
environment (``TBRM_BUFFER_*``; nested: ``TBRM_BUFFER_TABLE__MAX_SIZE=5000``; shared
``TBRM_REDIS_URL`` / ``TBRM_AUTH_TOKEN`` without prefix) > the ``[buffer]`` section of the run TOML named by
``TBRM_RUN_CONFIG`` (its ``[buffer.table]`` is the TableConfig the actors and learner use too) > defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from buffer.schema import TableConfig
from common.settings import RunTomlSettings


class BufferSettings(RunTomlSettings):
    """Configuration of the buffer API service (`python -m buffer`)."""

    model_config = SettingsConfigDict(
        env_prefix="TBRM_BUFFER_", env_nested_delimiter="__", extra="forbid", use_attribute_docstrings=True
    )
    toml_section: ClassVar[str] = "buffer"

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = Field(8002, ge=1, le=65535)
    """TCP port (default 8002)."""
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("redis_url", "TBRM_REDIS_URL")
    )
    """Redis holding the table, prompt queue and registry (shared env `TBRM_REDIS_URL`)."""
    auth_token: SecretStr | None = Field(None, validation_alias=AliasChoices("auth_token", "TBRM_AUTH_TOKEN"))
    """Bearer token for /v1/admin/* (shared env `TBRM_AUTH_TOKEN`); unset = admin endpoints refuse (401)."""
    table: TableConfig = Field(default_factory=TableConfig)
    """The replay table this API inspects (the same TableConfig as the actors' and the learner's)."""
    prompt_queue: str = Field("train", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Name of the prompt queue shown by /v1/prompts."""
    export_dir: Path = Path("runs/exports")
    """Server-side folder where POST /v1/admin/export writes parquet snapshots (names validated, no paths)."""
    redis_timeout_s: float = Field(10.0, gt=0)
    """Socket timeout of every Redis call."""
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    """Largest accepted request body (413 above it); the admin bodies are tiny."""
    rate_window_s: float = Field(60.0, gt=0)
    """Window over which insert/sample rates are computed."""
    log_level: str = "INFO"
    """Python logging level."""

