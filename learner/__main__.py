"""Run the learner service: the training loop and (rank 0) the status HTTP server in one process.

    python -m learner --host 127.0.0.1 --port 8003 --max-steps 100 --run-dir runs/x
    torchrun --nproc_per_node 2 -m learner ...      # data-parallel; only rank 0 serves HTTP and pushes

Every field of `LearnerSettings` is a flag, parsed by pydantic-settings' CLI (CLI > env TBRM_LEARNER_* > run TOML
[learner] > default); nested fields (`loss`, `schedule`, `table`) by dotted name (`--loss.kind tbrm --loss.beta
0.02`) or as JSON (`--loss '{"kind": "tbrm", "beta": 0.02}'`).
`--config PATH` names the run TOML (same as TBRM_RUN_CONFIG).
SIGTERM/SIGINT stop the loop after the current step; it then writes a checkpoint and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from learner.settings import LearnerSettings

log = logging.getLogger("learner")


def main(argv: list[str] | None = None) -> None:
    settings = LearnerSettings.from_cli(argv, "python -m learner", "tbrm DeepSpeed learner (TBRM / GRPO)")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"
    )
    # one INFO line per HTTP request of the weight pushes is noise; learner.push logs the outcome of each push
    logging.getLogger("httpx").setLevel(logging.WARNING)

    # Heavy imports only after the settings parsed (a bad flag fails in milliseconds).
    from learner.engine import configure_environment
    from learner.live import LiveStatus
    from learner.train import train

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
        import uvicorn

        from learner.app import create_app

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
