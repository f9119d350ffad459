"""Settings of the buffer API service (light module: pydantic only).

Precedence: CLI flag > environment (``TBRM_BUFFER_*``; nested: ``TBRM_BUFFER_TABLE__MAX_SIZE=5000``; shared
``TBRM_REDIS_URL`` / ``TBRM_AUTH_TOKEN`` without prefix) > the ``[buffer]`` section of the run TOML named by
``TBRM_RUN_CONFIG`` (its ``[buffer.table]`` is the TableConfig the actors and learner use too) > defaults.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from buffer.schema import TableConfig


def run_toml_section(section: str) -> dict[str, Any]:
    """The `[section]` table of the run TOML named by TBRM_RUN_CONFIG ({} when unset); shared by every service
    that may import the buffer (the reward service, which may not, reads its section itself)."""
    path = os.environ.get("TBRM_RUN_CONFIG")
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise ValueError(f"TBRM_RUN_CONFIG={path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"TBRM_RUN_CONFIG={path} is not valid TOML: {e}") from e
    sec = data.get(section, {})
    if not isinstance(sec, dict):
        raise ValueError(f"[{section}] in {path} must be a table")
    return sec


class RunTomlSource(PydanticBaseSettingsSource):
    """The `[buffer]` table of the run TOML (`TBRM_RUN_CONFIG`), if any."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.data: dict[str, Any] = {}
        path = os.environ.get("TBRM_RUN_CONFIG")
        if path:
            with Path(path).open("rb") as f:
                self.data = dict(tomllib.load(f).get("buffer", {}))

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.data


class BufferSettings(BaseSettings):
    """Configuration of the buffer API service (`python -m buffer`)."""

    model_config = SettingsConfigDict(env_prefix="TBRM_BUFFER_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = Field(8002, ge=1, le=65535)
    """TCP port (DESIGN.md §6: 8002)."""
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the CLI flags: CLI > env > run TOML > defaults.
        return init_settings, env_settings, RunTomlSource(settings_cls)
