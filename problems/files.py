"""Dataset files: the verl/TBRM format (what TBRM and verl train on; one row per problem), read and written::

    data_source: str                             e.g. "toy_arith", "math_dapo"
    prompt: list<struct<role: str, content: str>>  chat messages before the template
    ability: str                                 "math"
    reward_model: struct<style: str, ground_truth: str>
    extra_info: struct<index: int64, prompt_id: str>

`load_dataset` also reads plain question/answer files (parquet, JSONL or a JSON list): MATH-500
(`problem`/`answer`), GSM8K (`question`/`answer` with the final answer after `####`), DAPO-Math-17k (verl format),
and similar column pairs. Bad input raises `DatasetError` with the file, row and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from buffer.schema import Prompt
from problems import DatasetError

QUESTION_COLUMNS = ("problem", "question", "query", "input", "instruction")
"""Question columns tried in order when a file has no verl `prompt` column."""
ANSWER_COLUMNS = ("answer", "final_answer", "ground_truth", "gold", "target", "expected_answer")
"""Gold answer columns tried in order (a verl `reward_model.ground_truth` wins over all of them)."""
ID_COLUMNS = ("prompt_id", "unique_id", "id", "idx", "index")
CHAT_ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------------------------
# writing


def _verl_rows(prompts: list[Prompt]) -> list[dict[str, Any]]:
    return [
        {
            "data_source": p.data_source,
            "prompt": [{"role": m["role"], "content": m["content"]} for m in p.messages],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p.gold},
            "extra_info": {"index": i, "prompt_id": p.prompt_id},
        }
        for i, p in enumerate(prompts)
    ]


def write_dataset(prompts: list[Prompt], path: str | Path) -> None:
    """Write prompts in verl format: parquet (default), or JSONL when the path ends in `.jsonl`."""
    path = Path(path)
    if not prompts:
        raise DatasetError(f"refusing to write an empty dataset to {path}")
    for p in prompts:
        if any(set(m) != {"role", "content"} for m in p.messages):
            raise DatasetError(f"prompt {p.prompt_id!r}: messages must have exactly the keys role and content")
    rows = _verl_rows(prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".jsonl":
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("data_source", pa.string()),
                ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                ("ability", pa.string()),
                ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
                ("extra_info", pa.struct([("index", pa.int64()), ("prompt_id", pa.string())])),
            ]
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    tmp.replace(path)  # atomic: a reader never sees a half-written file


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a parquet, JSONL or JSON-list file."""
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, expected a .parquet, .jsonl or .json file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{path}: not a readable parquet file ({e})") from e
        return list(table.column_names), table.to_pylist()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        columns = sorted({k for r in rows for k in r})
        return columns, rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DatasetError(f"{path}: expected a JSON list of objects (one per problem)")
        return sorted({k for r in data for k in r}), data
    raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .parquet, .jsonl or .json")


def _scalar_answer(value: Any, where: str, column: str) -> str:
    """Gold answers as strings; numbers are accepted and formatted exactly (42, not 42.0)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or value is None:
        raise DatasetError(f"{where}: column {column!r} must be a string or number, got {value!r}")
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    else:
        raise DatasetError(f"{where}: column {column!r} must be a string or number, got {type(value).__name__}")
    text = text.strip()
    if not text:
        raise DatasetError(f"{where}: column {column!r} is empty (no gold answer)")
    return text


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # some datasets store the question itself under `prompt`
        value = [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from pandas-written files
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: column 'prompt' must be a non-empty list of chat messages, got {value!r:.80}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: prompt message {j} must have string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in CHAT_ROLES:
            raise DatasetError(f"{where}: prompt message {j} has unknown role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise DatasetError(f"{where}: prompt has no non-empty user message")
    return out


def _gsm8k_answer(text: str) -> str:
    """GSM8K answers carry the worked solution, then `#### <final answer>`."""
    return text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else text


def _first_column(columns: list[str], candidates: tuple[str, ...], where: str, what: str, verl: str) -> str:
    """The first of `candidates` present in `columns`; DatasetError naming what was expected otherwise."""
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise DatasetError(
            f"{where}: no {what} column; expected {verl} or one of {candidates} (columns present: {sorted(columns)})"
        )
    return found


def _row_to_prompt(row: dict[str, Any], where: str, columns: list[str], default_source: str) -> Prompt:
    if "prompt" in columns:
        messages = _messages(row.get("prompt"), where)
    else:
        qcol = _first_column(columns, QUESTION_COLUMNS, where, "question", "a verl 'prompt' column")
        question = row.get(qcol)
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"{where}: column {qcol!r} must be a non-empty string, got {question!r:.80}")
        messages = [{"role": "user", "content": question}]

    reward_model = row.get("reward_model")
    if reward_model is not None:
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise DatasetError(f"{where}: column 'reward_model' must be a struct with a 'ground_truth' field")
        gold = _scalar_answer(reward_model["ground_truth"], where, "reward_model.ground_truth")
    else:
        acol = _first_column(columns, ANSWER_COLUMNS, where, "answer", "'reward_model.ground_truth'")
        gold = _scalar_answer(row.get(acol), where, acol)
        if acol == "answer" and "question" in columns:
            gold = _gsm8k_answer(gold)

    source = row.get("data_source")
    if source is not None and not isinstance(source, str):
        raise DatasetError(f"{where}: column 'data_source' must be a string, got {type(source).__name__}")
    return Prompt(prompt_id="_", messages=messages, gold=gold, data_source=source or default_source)


def _row_id(row: dict[str, Any]) -> str | None:
    extra = row.get("extra_info")
    if isinstance(extra, dict):
        for key in ("prompt_id", "index"):
            if extra.get(key) is not None:
                return str(extra[key])
    for key in ID_COLUMNS:
        if isinstance(row.get(key), (str, int)) and not isinstance(row.get(key), bool):
            return str(row[key])
    return None


def load_dataset(path: str | Path, *, limit: int | None = None) -> list[Prompt]:
    """Read a dataset file (parquet/JSONL/JSON) in verl format or with question/answer columns.

    Prompt ids come from `extra_info.prompt_id`/`extra_info.index` or an id column when those are present and
    unique, else `{file stem}-{row}`. `limit` keeps the first rows only. Raises `DatasetError` naming the
    file, the row and the problem on any bad input.
    """
    path = Path(path)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be a non-negative integer or None, got {limit!r}")
    columns, rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    if limit is not None:
        rows = rows[:limit]
    prompts = [
        _row_to_prompt(row, f"{path} row {i}", columns, default_source=path.stem) for i, row in enumerate(rows)
    ]
    ids = [_row_id(r) for r in rows]
    if any(i is None or not 0 < len(i) <= 200 for i in ids) or len(set(ids)) != len(ids):
        ids = [f"{path.stem}-{i:06d}" for i in range(len(rows))]
    return [p.model_copy(update={"prompt_id": pid}) for p, pid in zip(prompts, ids, strict=True)]
