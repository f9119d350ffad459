"""Run the buffer API service: ``python -m buffer --host 127.0.0.1 --port 8002`` (``--help`` lists every setting).

Every field of `BufferSettings` is a flag (command line > env TBRM_BUFFER_* > run TOML [buffer] > default), nested
ones by dotted name (`--table.name replay`, `--table.max-size 5000`); `--config PATH` names the run TOML.
"""

from __future__ import annotations

import logging


def main(argv: list[str] | None = None) -> None:
    from buffer.settings import BufferSettings

    settings = BufferSettings.from_cli(
        argv, "python -m buffer",
        "tbrm buffer API: replay-table stats, trajectories, actors, weights, learner, admin. Shared environment: "
        "TBRM_REDIS_URL, TBRM_AUTH_TOKEN, TBRM_RUN_CONFIG.",
    )  # fmt: skip
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from buffer.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    main()
