"""The repository carries its own docs: no tracked file points at planning notes that live outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# spelled in pieces so that this file does not match itself
OUTSIDE_NOTES = [name + ".md" for name in ("DESIGN", "RECIPES", "STYLE")]


def test_no_file_refers_to_notes_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for rel in tracked:
        path = REPO / rel
        if not path.is_file() or path.suffix in {".png", ".whl", ".safetensors", ".parquet"}:
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{rel}: {n}" for n in OUTSIDE_NOTES if n in text]
    assert tracked and not offenders, offenders
