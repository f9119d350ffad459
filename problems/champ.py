"""CHAMP (Mao et al. 2024): 270 competition problems with final answers, from the champ-dataset package."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from buffer.schema import Prompt
from problems import DatasetError


def _champ_file() -> Path:
    try:
        root = resources.files("champ_dataset")
    except ModuleNotFoundError as e:
        raise DatasetError("the champ-dataset package is not installed (pip install champ-dataset)") from e
    path = Path(str(root)) / "dataset_files" / "v0.json"
    if not path.exists():
        raise DatasetError(f"champ-dataset is installed but its data file {path} is missing")
    return path


def load_champ() -> list[Prompt]:
    """The 270 CHAMP competition problems (Mao et al. 2024) with their final answers, for evaluation.

    Gold answers are free-form in places ("No", "x=2, y=1", "C(n+1, 2m+1)"); the grader decides what matches.
    """
    path = _champ_file()
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: unexpected CHAMP file layout ({e})") from e
    out = []
    for key, problem in problems.items():
        text, answer = problem.get("_text"), problem.get("_answer")
        if not isinstance(text, str) or not isinstance(answer, str) or not answer.strip():
            raise DatasetError(f"{path}: CHAMP problem {key!r} lacks a text or a final answer")
        out.append(
            Prompt(
                prompt_id=str(problem.get("identifier", key)),
                messages=[{"role": "user", "content": text}],
                gold=answer.strip(),
                data_source="champ",
            )
        )
    return out
