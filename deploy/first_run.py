"""Caches a fresh machine's first run would fill inside its time budget, filled before the budget starts instead.

`tbrm up` times a run from the start of its services, so whatever they do once per machine counts against the
first run only. Measured on a fresh 2-core machine (default `tbrm up`, 2026-12-03): the learner was ready to train
96 s after its start (11 s on the next run) and the actor 47 s (17 s), leaving the first run 860 learner steps of
5 minutes. The two one-off costs:

1. DeepSpeed compiles its CPU shared-memory comm op (C++, ninja) at the learner's first `initialize`, into
   TORCH_EXTENSIONS_DIR (`$TBRM_HOME/torch_extensions`, where the launcher points every service);
2. vLLM inspects the model's architecture class in a subprocess at its first engine start and caches the answer
   under VLLM_CACHE_ROOT (`~/.cache/vllm/modelinfos`), about 20 s here.

`warm(model_dir, extensions_dir)` fills both in one subprocess (the launcher stays free of torch and vLLM) and
records that in a marker named after the installed versions and the model's architectures, so later runs skip it
without importing anything. Like building the toy model it is setup, not training: `tbrm up` runs it before the
budget starts. A failure is reported and the run goes on (the services then fill the caches themselves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("torch", "deepspeed", "vllm")
"""The installs whose caches these are: a new version of any of them makes the marker stale."""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def marker_path(model_dir: Path, extensions_dir: Path) -> Path:
    """Where `warm` records success for these installs, this model's architectures and this op cache."""
    try:
        arch = json.loads((model_dir / "config.json").read_text()).get("architectures")
    except (OSError, ValueError):
        arch = None
    key = json.dumps([[_version(p) for p in PACKAGES], arch, str(extensions_dir.resolve())])
    return extensions_dir / f".tbrm-warm-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def fill(model_dir: Path) -> None:
    """In this process: compile DeepSpeed's CPU comm op (when this machine's accelerator has one) and let vLLM
    inspect and cache the model's architecture class."""
    from learner.collectives import default_accelerator

    os.environ.setdefault("DS_ACCELERATOR", default_accelerator())
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load()
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs(model=str(model_dir), max_model_len=64).create_model_config()


def warm(model_dir: Path, extensions_dir: Path, say: Callable[[str], None] = log.info) -> bool:
    """Fill the caches once per install and model (see the module docstring); True when they are (now) filled."""
    marker = marker_path(model_dir, extensions_dir)
    if marker.exists():
        return True
    say("compiling DeepSpeed's CPU comm op, caching vLLM's model inspection (once per install; ~1-2 min) ...")
    t = time.monotonic()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    proc = subprocess.run([sys.executable, "-m", "deploy.first_run", str(model_dir)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        say(f"warning: filling the first-run caches failed (the services will fill them): {' | '.join(tail)}")
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    say(f"first-run caches ready ({time.monotonic() - t:.0f} s)")
    return True


if __name__ == "__main__":
    fill(Path(sys.argv[1]))
