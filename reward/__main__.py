"""Run the reward service: ``python -m reward --host 127.0.0.1 --port 8001 [--workers 2 ...]``.

Every setting of `RewardSettings` is a flag, parsed by pydantic-settings' CLI (command line > env TBRM_REWARD_* >
run TOML [reward] > default); nested ones by dotted name (`--scores.incorrect -1`) or as JSON
(`--scores '{"incorrect": -1}'`); `--config PATH` names the run TOML (same as TBRM_RUN_CONFIG).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from pydantic_settings import CliSettingsSource

from reward.settings import RewardSettings


def build_parser() -> tuple[argparse.ArgumentParser, CliSettingsSource[Any]]:
    p = argparse.ArgumentParser(
        prog="python -m reward", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="tbrm math reward service\n\nPrecedence: command line > environment (TBRM_REWARD_<FIELD>, nested "
        "with __) > the [reward] table of the run TOML (--config / TBRM_RUN_CONFIG) > defaults.",
    )  # fmt: skip
    p.add_argument("--config", type=Path, default=None, metavar="RUN_TOML",
                   help="run TOML whose [reward] table holds settings (same as TBRM_RUN_CONFIG)")
    source = CliSettingsSource(RewardSettings, root_parser=p, cli_kebab_case=True, cli_implicit_flags=True,
                               cli_use_class_docs_for_groups=True)  # fmt: skip
    return p, source


def main(argv: list[str] | None = None) -> None:
    parser, source = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        os.environ["TBRM_RUN_CONFIG"] = str(args.config)
    del args.config
    settings = RewardSettings(_cli_settings_source=source(parsed_args=args))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from reward.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
