"""Settings of the buffer API service (light module: pydantic only).

Precedence: command line (`python -m buffer --help`; pydantic-settings' CLI, dotted names for nested fields) >
environment (``TBRM_BUFFER_*``; nested: ``TBRM_BUFFER_TABLE__MAX_SIZE=5000``; shared
``TBRM_REDIS_URL`` / ``TBRM_AUTH_TOKEN`` without prefix) > the ``[buffer]`` section of the run TOML named by
``TBRM_RUN_CONFIG`` (its ``[buffer.table]`` is the TableConfig the actors and learner use too) > defaults.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar

from pydantic import AliasChoices, BaseModel, Field, SecretStr, create_model
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

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


class RunTomlSettings(BaseSettings):
    """Base of the services' settings: CLI (init kwargs) > environment > the run TOML's `[toml_section]` > defaults.

    Subclasses set `toml_section`. The reward service, which may not import the buffer, has its own reader."""

    toml_section: ClassVar[str]

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON with secrets replaced (for /v1/config and logs)."""
        data = self.model_dump(mode="json")
        if data.get("auth_token"):
            data["auth_token"] = "***"
        return data

    @classmethod
    def config_view(cls) -> type[BaseModel]:
        """The response model of `GET /v1/config`: every field as `redacted()` serves it (secrets as "***"), with
        its documentation, so the OpenAPI schema shows each service's settings."""
        fields: dict[str, Any] = {}
        for name, f in cls.model_fields.items():
            secret = name == "auth_token"
            annotation = (str | None) if secret else f.annotation
            fields[name] = (annotation, Field(description=f.description, discriminator=None if secret else f.discriminator))
        return create_model(f"{cls.__name__}View", __doc__=f"Settings served by /v1/config ({cls.__name__}).", **fields)

    @classmethod
    def cli_parser(cls, prog: str, description: str) -> tuple[argparse.ArgumentParser, CliSettingsSource[Any]]:
        """pydantic-settings' CLI over every field, documented from the field docstrings: `--field-name VALUE`,
        nested fields by dotted name (`--table.max-size 5000`, `--loss.kind grpo --loss.beta 0.02`) or as JSON
        (`--table '{"max_size": 5000}'`), booleans as `--flag` / `--no-flag`; plus `--config` for the run TOML."""
        env = cls.model_config.get("env_prefix", "")
        parser = argparse.ArgumentParser(
            prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{description}\n\nPrecedence: command line > environment ({env}<FIELD>, nested with __) > "
            f"the [{cls.toml_section}] table of the run TOML (--config / TBRM_RUN_CONFIG) > defaults.",
        )  # fmt: skip
        parser.add_argument("--config", type=Path, default=None, metavar="RUN_TOML",
                            help=f"run TOML whose [{cls.toml_section}] table holds settings (same as TBRM_RUN_CONFIG)")
        source = CliSettingsSource(cls, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                                   cli_use_class_docs_for_groups=True)  # fmt: skip
        return parser, source

    @classmethod
    def from_cli(cls, argv: list[str] | None, prog: str, description: str) -> typing.Self:
        """Parse the command line (it overrides env and run TOML); `--config` sets TBRM_RUN_CONFIG."""
        parser, source = cls.cli_parser(prog, description)
        args = parser.parse_args(argv)
        config = args.config
        del args.config
        if config is not None:
            os.environ["TBRM_RUN_CONFIG"] = str(config)
        return cls(_cli_settings_source=source(parsed_args=args))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = InitSettingsSource(settings_cls, init_kwargs=run_toml_section(cls.toml_section))
        return init_settings, env_settings, toml


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

