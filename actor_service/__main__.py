"""Run one actor: ``python -m actor_service --host 127.0.0.1 --port 8100 [--model-dir DIR ...]``.

Every field of `ActorSettings` is a flag (CLI > env TBRM_ACTOR_* > run TOML [actor] > default); `--table` takes
JSON (e.g. `--table '{"max_size": 10000}'`), `--config PATH` names the run TOML (same as TBRM_RUN_CONFIG).
Settings are parsed before vLLM is imported, so `--help` and configuration errors answer at once.
SIGTERM/SIGINT: the sampling loop stops taking prompts, finishes or gives back the batch in flight, the actor
deregisters, and the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import signal
import threading
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from actor_service.settings import ActorSettings


def _arg_type(annotation: Any) -> Any:
    """argparse converter for a settings field: scalars as themselves, bools from words, models as JSON."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
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
    p = argparse.ArgumentParser(prog="python -m actor_service", description="tbrm vLLM actor service")
    p.add_argument("--config", type=Path, default=None, help="run TOML whose [actor] table holds settings "
                   "(same as TBRM_RUN_CONFIG)")
    for name, field in ActorSettings.model_fields.items():
        default = field.default if field.default_factory is None else "(computed)"
        p.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=_arg_type(field.annotation), default=None,
            help=f"{(field.description or '').strip()} (default {default})".replace("%", "%%"),
        )
    return p


def main(argv: list[str] | None = None) -> None:
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    config = args.pop("config", None)
    if config is not None:
        os.environ["TBRM_RUN_CONFIG"] = str(config)
    settings = ActorSettings(**args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Heavy imports only now: the in-process vLLM engine (V1 multiprocessing off) starts in seconds on CPU.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import uvicorn

    from actor_service.app import create_app

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM after its graceful shutdown (exit status -15); an actor that
        stopped cleanly (prompts finished or given back, deregistered) exits 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    # Measured for weight pushes on loopback: asyncio + httptools streams a request body at ~1.1 GB/s, uvloop +
    # httptools at ~0.4 GB/s, h11 at ~0.2 GB/s.
    http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, loop="asyncio",
                            http=http_impl, log_level=settings.log_level, access_log=False)
    GracefulServer(config).run()


if __name__ == "__main__":
    main()
