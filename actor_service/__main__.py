"""Run one actor: ``python -m actor_service --host 127.0.0.1 --port 8100 [--model-dir DIR ...]``.

Every field of `ActorSettings` is a flag, parsed by pydantic-settings' CLI (CLI > env TBRM_ACTOR_* > run TOML
[actor] > default); nested fields by dotted name (`--table.max-size 10000`) or as JSON
(`--table '{"max_size": 10000}'`), `--config PATH` names the run TOML (same as TBRM_RUN_CONFIG).
Settings are parsed before vLLM is imported, so `--help` and configuration errors answer at once.
SIGTERM/SIGINT: the sampling loop stops taking prompts, finishes or gives back the batch in flight, the actor
deregisters, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from actor_service.settings import ActorSettings


def main(argv: list[str] | None = None) -> None:
    settings = ActorSettings.from_cli(argv, "python -m actor_service", "tbrm vLLM actor service")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn  # heavy imports only now

    from actor_service.app import create_app, server_config

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

    GracefulServer(server_config(create_app(settings), settings.host, settings.port, settings.log_level)).run()


if __name__ == "__main__":
    main()
