"""Run the reward service: ``python -m reward --host 127.0.0.1 --port 8001 [--workers 2 ...]``.

Every setting of `RewardSettings` is a flag, parsed by pydantic-settings' CLI (command line > env TBRM_REWARD_* >
run TOML [reward] > default); nested ones by dotted name (`--scores.incorrect -1`) or as JSON
(`--scores '{"incorrect": -1}'`); `--config PATH` names the run TOML (same as TBRM_RUN_CONFIG).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pydantic_settings import CliSettingsSource

from reward.settings import RewardSettings

PROG, DESCRIPTION = "python -m reward", "tbrm math reward service"


def build_parser() -> tuple[argparse.ArgumentParser, CliSettingsSource[Any]]:
    return RewardSettings.cli_parser(PROG, DESCRIPTION)


def main(argv: list[str] | None = None) -> None:
    settings = RewardSettings.from_cli(argv, PROG, DESCRIPTION)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from reward.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
