"""The settings base class of every service, its run-TOML reader and its command line (light: pydantic only).

Precedence of every service's settings: command line > environment (`TBRM_<SERVICE>_*`, nested with `__`) > the
service's table of the run TOML named by `TBRM_RUN_CONFIG` (or `--config`) > defaults.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field, create_model
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
)


def run_toml_section(section: str) -> dict[str, Any]:
    """The `[section]` table of the run TOML named by TBRM_RUN_CONFIG ({} when unset or absent)."""
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


def cli_source(model: type[BaseModel], parser: argparse.ArgumentParser) -> CliSettingsSource[Any]:
    """pydantic-settings' CLI over every field of `model`, added to `parser`: `--field-name VALUE`, nested fields
    by dotted name (`--table.max-size 5000`) or as JSON (`--table '{"max_size": 5000}'`), booleans as `--flag` /
    `--no-flag`, help from the field docstrings. The one CLI convention of the services and `tbrm up`."""
    return CliSettingsSource(model, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                             cli_use_class_docs_for_groups=True)  # fmt: skip


class RunTomlSettings(BaseSettings):
    """Base of the services' settings: CLI (init kwargs) > environment > the run TOML's `[toml_section]` > defaults.

    Subclasses set `toml_section`."""

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
        """The service's command line (`cli_source` over every field) plus `--config` for the run TOML."""
        env = cls.model_config.get("env_prefix", "")
        parser = argparse.ArgumentParser(
            prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{description}\n\nPrecedence: command line > environment ({env}<FIELD>, nested with __) > "
            f"the [{cls.toml_section}] table of the run TOML (--config / TBRM_RUN_CONFIG) > defaults.",
        )  # fmt: skip
        parser.add_argument("--config", type=Path, default=None, metavar="RUN_TOML",
                            help=f"run TOML whose [{cls.toml_section}] table holds settings (same as TBRM_RUN_CONFIG)")
        return parser, cli_source(cls, parser)

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
