"""Container health probe: `python -m deploy.healthcheck [URL]` exits 0 when URL answers HTTP 200, else 1.

Used by the images' HEALTHCHECK and the compose/k8s probes (deploy/topology.py renders the command). Without a URL
it probes `http://127.0.0.1:PORT/health` with PORT taken from the `--port` flag of the container's main process
(PID 1 after the entrypoint's exec), so one image serves every service. Standard library only: it runs every few
seconds and must start fast.
"""

from __future__ import annotations

import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 3.0

log = logging.getLogger("tbrm.healthcheck")


def port_from_cmdline(cmdline: list[str]) -> int | None:
    """The value of `--port P` / `--port=P` in an argv, or None."""
    for i, arg in enumerate(cmdline):
        if arg == "--port" and i + 1 < len(cmdline) and cmdline[i + 1].isdigit():
            return int(cmdline[i + 1])
        if arg.startswith("--port=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return None


def default_url(proc_cmdline: Path = Path("/proc/1/cmdline")) -> str | None:
    try:
        raw = proc_cmdline.read_bytes()
    except OSError:
        return None
    port = port_from_cmdline([a.decode(errors="replace") for a in raw.split(b"\0") if a])
    return None if port is None else f"http://127.0.0.1:{port}/health"


def probe(url: str, timeout_s: float = TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # http URL from our config
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("health probe %s failed: %s", url, exc)
        return False


def main(args: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    url = args[0] if args else default_url()
    if url is None:
        log.error("no URL given and no --port found in /proc/1/cmdline")
        return 1
    return 0 if probe(url) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
