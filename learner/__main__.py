"""Run the learner service: the training loop and (rank 0) the status HTTP server in one process.

    python -m learner --host 127.0.0.1 --port 8003 --max-steps 100 --run-dir runs/x
    torchrun --nproc_per_node 2 -m learner ...      # data-parallel; only rank 0 serves HTTP and pushes

Every field of `LearnerSettings` is a flag (CLI > env TBRM_LEARNER_* > run TOML [learner] > default); nested
fields (`--loss`, `--schedule`, `--table`) take JSON, e.g. `--loss '{"kind": "tbrm", "beta": 0.02}'`.
SIGTERM/SIGINT stop the loop after the current step; it then writes a checkpoint and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import types
import typing
from pathlib import Path
from typing import Any

from learner.settings import LearnerSettings

log = logging.getLogger("learner")


def _arg_type(annotation: Any) -> Any:
    """argparse converter for a settings field: scalars as themselves, models/tuples/unions of models as JSON."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation in (int, float, str):
        return annotation
    if annotation is Path:
        return Path
    if annotation is bool:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return json.loads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m learner", description="tbrm DeepSpeed learner (TBRM / GRPO)")
    for name, field in LearnerSettings.model_fields.items():
        default = field.default if field.default_factory is None else "(computed)"
        p.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=_arg_type(field.annotation), default=None,
            help=f"{(field.description or '').strip()} (default {default})",
        )
    return p


def main(argv: list[str] | None = None) -> None:
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    settings = LearnerSettings(**args)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"
    )
    # one INFO line per HTTP request of the weight pushes is noise; learner.push logs the outcome of each push
    logging.getLogger("httpx").setLevel(logging.WARNING)

    # Heavy imports only after the settings parsed (a bad flag fails in milliseconds).
    from learner.live import LiveStatus  # noqa: PLC0415
    from learner.train import configure_environment, train  # noqa: PLC0415

    configure_environment()
    stop = threading.Event()
    live = LiveStatus()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    server = None
    if rank == 0 and settings.port:
        import uvicorn  # noqa: PLC0415

        from learner.app import create_app  # noqa: PLC0415

        config = uvicorn.Config(
            create_app(settings, live), host=settings.host, port=settings.port, log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, name="status-http", daemon=True).start()
        log.info("status server on http://%s:%d", settings.host, settings.port)
    try:
        train(settings, stop=stop, live=live)
    finally:
        if server is not None:
            server.should_exit = True


if __name__ == "__main__":
    main()
