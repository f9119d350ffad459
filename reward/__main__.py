"""Run the reward service: ``python -m reward --host 127.0.0.1 --port 8001 [--workers 2 ...]``.

Every setting of `RewardSettings` is a flag (CLI > env TBRM_REWARD_* > run TOML [reward] > default).
"""

from __future__ import annotations

import argparse
import logging

from reward.settings import RewardSettings, ScoreMap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reward", description="tbrm math reward service")
    for name, field in RewardSettings.model_fields.items():
        if name == "scores":
            continue
        kind = field.annotation if field.annotation in (int, float) else str
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                       help=f"{field.description or ''} (default {field.default})")
    for name, field in ScoreMap.model_fields.items():
        p.add_argument(f"--score-{name.replace('_', '-')}", dest=f"score_{name}", type=float, default=None,
                       help=f"score of status {name} (default {field.default})")
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    overrides = {k: v for k, v in args.items() if v is not None and not k.startswith("score_")}
    base = RewardSettings(**overrides)
    score_overrides = {k[len("score_"):]: v for k, v in args.items() if k.startswith("score_") and v is not None}
    settings = base.model_copy(update={"scores": base.scores.model_copy(update=score_overrides)})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from reward.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
