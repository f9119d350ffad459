"""Files on disk: the `$TBRM_HOME` cache folder, the toy model's and the compiled ops' places in it, and file
digests (standard library)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tbrm_home() -> Path:
    """`$TBRM_HOME` (default `~/.cache/tbrm`): built models, downloads and compiled extensions."""
    return Path(os.environ.get("TBRM_HOME", "~/.cache/tbrm")).expanduser()


def toy_model_dir() -> Path:
    """`$TBRM_HOME/models/toy`: where the toy model is built and cached (the actor's and the learner's default)."""
    return tbrm_home() / "models" / "toy"


def torch_extensions_dir() -> Path:
    """Where DeepSpeed's compiled ops are cached: `$TORCH_EXTENSIONS_DIR`, else `$TBRM_HOME/torch_extensions` (the
    learner's default, and what `tbrm up` gives every service)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or tbrm_home() / "torch_extensions")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (never whole in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
