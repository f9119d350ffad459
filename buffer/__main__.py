"""Run the buffer API service: ``python -m buffer --host 127.0.0.1 --port 8002`` (``--help`` lists options)."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m buffer",
        description="tbrm buffer API: replay-table stats, trajectories, actors, weights, learner, admin. "
        "Environment: TBRM_BUFFER_* (e.g. TBRM_BUFFER_TABLE__MAX_SIZE), TBRM_REDIS_URL, TBRM_AUTH_TOKEN, "
        "TBRM_RUN_CONFIG (run TOML; its [buffer] section).",
    )
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8002)")
    parser.add_argument("--redis-url", help="Redis URL (default $TBRM_REDIS_URL or redis://127.0.0.1:6379/0)")
    parser.add_argument("--table", help="name of the replay table to serve (default 'replay')")
    parser.add_argument("--prompt-queue", help="name of the prompt queue shown by /v1/prompts (default 'train')")
    parser.add_argument("--export-dir", help="folder for POST /v1/admin/export snapshots")
    parser.add_argument("--log-level", help="logging level (default INFO)")
    args = parser.parse_args(argv)

    from buffer.settings import BufferSettings  # noqa: PLC0415

    cli: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None and k != "table"}
    settings = BufferSettings(**cli)
    if args.table:
        settings = settings.model_copy(update={"table": settings.table.model_copy(update={"name": args.table})})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn  # noqa: PLC0415

    from buffer.app import create_app  # noqa: PLC0415

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    main()
