"""`tbrm data prepare`: convert a user's math dataset file into the training file (verl format) with a prompt
template (offline, on files; the cluster's own preparation, config + model + prompt queue, is deploy/prepare.py).

    tbrm data prepare dapo.parquet data/train.parquet --template qwen-math --max-prompt-chars 2000 --shuffle-seed 0
    tbrm data prepare my.jsonl out.parquet --question-col problem --answer-col solution_final
    tbrm data prepare champ data/champ.parquet           # the 270 CHAMP problems (champ-dataset package)

Input: parquet, JSONL or a JSON list, either in verl/TBRM format (`prompt` chat list + `reward_model.ground_truth`)
or with a question and an answer column (auto-detected by `problems.files.load_dataset`, or named with
`--question-col`/`--answer-col`). Output: `problems.files.write_dataset` (parquet, or JSONL for a `.jsonl` path), which
`tbrm up` / `deploy.prepare` load as `[run] dataset`.

Templates (what the prompt's chat messages become):
- `qwen-math` (default, the TBRM paper's): system "Please reason step by step, and put your final answer within
  \\boxed{}." + the question as the user turn. The actor's own system prompt is then not added (it only adds one
  when the messages do not start with a system turn).
- `r1`: one user turn in the DeepSeek-R1-Zero style (think inside <think></think>, then the answer in \\boxed{}).
  Run actors with `[actor] system_prompt = ""` so that no system turn precedes it.
- `keep`: the messages as they are in a verl file (only filtering, dedup and shuffling).

Filters, in order: `--data-source` (keep rows whose data_source is one of the names), `--max-prompt-chars` (drop
questions longer than N characters), duplicates (same question and gold answer; DAPO-Math-17k's parquet repeats
each problem many times), then `--shuffle-seed` and `--limit`. Every bad input raises `DatasetError` naming the file,
the row or the column.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from actor_service.schema import DEFAULT_SYSTEM_PROMPT
from buffer.schema import Prompt
from problems import DatasetError
from problems.champ import load_champ
from problems.files import (
    ANSWER_COLUMNS,
    QUESTION_COLUMNS,
    _messages,
    _read_rows,
    _scalar_answer,
    load_dataset,
    write_dataset,
)

log = logging.getLogger(__name__)

Template = Literal["qwen-math", "r1", "keep"]
TEMPLATES: tuple[str, ...] = ("qwen-math", "r1", "keep")

R1_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a math question and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process step by step and then gives the final answer. "
    "The reasoning is enclosed in <think> </think> tags and the final answer follows within \\boxed{{}}, i.e. "
    "<think> reasoning here </think> The answer is \\boxed{{answer here}}.\n\nQuestion: {question}"
)
"""The `r1` user turn (R1-Zero style), with `\\boxed{}` so that the reward grader finds the answer."""

# DAPO-Math-17k wraps every problem in answer-format instructions ("Answer: $Answer") that contradict \boxed{}:
# the templates replace them, so the bare problem is recovered first.
_DAPO_WRAPPER = re.compile(
    r"^\s*Solve the following math problem step by step\. The last line of your response should be of the form "
    r"Answer: \$Answer \(without quotes\) where \$Answer is the answer to the problem\.\s*(?P<q>.*?)\s*"
    r"Remember to put your answer on its own line after \"Answer:\"\.?\s*$",
    re.DOTALL,
)


class PrepareOptions(BaseModel):
    """Options of `tbrm data prepare` (CLI flags of the same names)."""

    model_config = ConfigDict(extra="forbid")

    template: Template = "qwen-math"
    """Prompt template: qwen-math (system + user), r1 (one user turn with <think>), keep (messages unchanged)."""
    question_col: str | None = None
    """Question column of a plain file (None = verl `prompt`, or auto-detected: problem, question, ...)."""
    answer_col: str | None = None
    """Gold answer column (None = verl `reward_model.ground_truth`, or auto-detected: answer, ...)."""
    data_sources: list[str] = Field(default_factory=list)
    """Keep only rows whose data_source is one of these (empty = all)."""
    max_prompt_chars: int | None = Field(default=None, ge=1)
    """Drop questions longer than this many characters (None = no limit)."""
    dedup: bool = True
    """Drop repeated (question, gold) pairs, keeping the first."""
    shuffle_seed: int | None = None
    """Shuffle the rows with this seed (None = keep the file order)."""
    limit: int | None = Field(default=None, ge=1)
    """Keep the first N rows after filtering and shuffling."""


class PrepareReport(BaseModel):
    """What `prepare` did, for the CLI summary."""

    read: int
    dropped_source: int = 0
    dropped_length: int = 0
    dropped_duplicate: int = 0
    written: int = 0
    output: str = ""
    data_sources: dict[str, int] = Field(default_factory=dict)
    """Rows written per data_source."""


def question_of(p: Prompt) -> str:
    """The problem text of a prompt: its last user turn, without a known dataset wrapper (DAPO's)."""
    users = [m["content"] for m in p.messages if m.get("role") == "user"]
    text = users[-1] if users else p.messages[-1]["content"]
    m = _DAPO_WRAPPER.match(text)
    return m.group("q").strip() if m else text.strip()


def apply_template(p: Prompt, template: Template) -> Prompt:
    """The prompt with its messages rewritten by `template` (gold, id and data_source kept)."""
    if template == "keep":
        return p
    q = question_of(p)
    if template == "qwen-math":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": q}]
    else:
        messages = [{"role": "user", "content": R1_TEMPLATE.format(question=q)}]
    return p.model_copy(update={"messages": messages})


def _column_prompts(path: Path, question_col: str | None, answer_col: str | None) -> list[Prompt]:
    """Prompts from explicitly named columns; the one not named falls back to the verl column (`prompt`,
    `reward_model.ground_truth`) or the first known column name (`problems.files.QUESTION_COLUMNS`/`ANSWER_COLUMNS`)."""
    columns, rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    for flag, col in (("--question-col", question_col), ("--answer-col", answer_col)):
        if col is not None and col not in columns:
            raise DatasetError(f"{path}: column {col!r} ({flag}) not found; columns present: {columns}")
    if question_col is None and "prompt" not in columns:
        question_col = next((c for c in QUESTION_COLUMNS if c in columns), None)
        if question_col is None:
            raise DatasetError(f"{path}: no question column; pass --question-col (columns present: {columns})")
    if answer_col is None and "reward_model" not in columns:
        answer_col = next((c for c in ANSWER_COLUMNS if c in columns), None)
        if answer_col is None:
            raise DatasetError(f"{path}: no answer column; pass --answer-col (columns present: {columns})")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        if question_col is not None:
            q = row.get(question_col)
            if not isinstance(q, str) or not q.strip():
                raise DatasetError(f"{where}: column {question_col!r} must be a non-empty string, got {q!r:.80}")
            messages = [{"role": "user", "content": q}]
        else:
            messages = _messages(row.get("prompt"), where)
        if answer_col is not None:
            gold = _scalar_answer(row.get(answer_col), where, answer_col)
        else:
            rm = row.get("reward_model")
            if not isinstance(rm, dict) or "ground_truth" not in rm:
                raise DatasetError(f"{where}: column 'reward_model' must be a struct with a 'ground_truth' field")
            gold = _scalar_answer(rm["ground_truth"], where, "reward_model.ground_truth")
        source = row.get("data_source")
        if source is not None and not isinstance(source, str):
            raise DatasetError(f"{where}: column 'data_source' must be a string, got {type(source).__name__}")
        out.append(Prompt(prompt_id=f"{path.stem}-{i:06d}", messages=messages, gold=gold, data_source=source or path.stem))
    return out


def read_prompts(source: str | Path, question_col: str | None = None, answer_col: str | None = None) -> list[Prompt]:
    """The prompts of a dataset file, or of `champ` (the champ-dataset package)."""
    if str(source) == "champ":
        if question_col or answer_col:
            raise DatasetError("--question-col/--answer-col do not apply to the built-in 'champ' problems")
        return load_champ()
    path = Path(source)
    if question_col is None and answer_col is None:
        return load_dataset(path)
    return _column_prompts(path, question_col, answer_col)


def filter_prompts(prompts: Sequence[Prompt], opts: PrepareOptions) -> tuple[list[Prompt], PrepareReport]:
    """Filters, dedup, shuffle and limit of the module docstring, in that order."""
    report = PrepareReport(read=len(prompts))
    kept: list[Prompt] = []
    seen: set[tuple[str, str]] = set()
    wanted = set(opts.data_sources)
    for p in prompts:
        if wanted and p.data_source not in wanted:
            report.dropped_source += 1
            continue
        q = question_of(p)
        if opts.max_prompt_chars is not None and len(q) > opts.max_prompt_chars:
            report.dropped_length += 1
            continue
        if opts.dedup:
            key = (q, p.gold)
            if key in seen:
                report.dropped_duplicate += 1
                continue
            seen.add(key)
        kept.append(p)
    if opts.shuffle_seed is not None:
        random.Random(opts.shuffle_seed).shuffle(kept)
    if opts.limit is not None:
        kept = kept[: opts.limit]
    return kept, report


def _unique_ids(prompts: list[Prompt]) -> list[Prompt]:
    """Prompt ids must be unique in the queue; repeated ids (e.g. per-source indices) get a row suffix."""
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.prompt_id] = counts.get(p.prompt_id, 0) + 1
    if all(c == 1 for c in counts.values()):
        return prompts
    return [p.model_copy(update={"prompt_id": f"{p.prompt_id}-{i:06d}"}) for i, p in enumerate(prompts)]


def prepare(source: str | Path, output: str | Path, opts: PrepareOptions | None = None) -> PrepareReport:
    """Read `source` (file or `champ`), filter, template, write `output`; returns counts. Raises DatasetError."""
    opts = opts or PrepareOptions()
    output = Path(output)
    if output.suffix.lower() not in (".parquet", ".jsonl"):
        raise DatasetError(f"{output}: the output must end in .parquet or .jsonl")
    if str(source) != "champ" and Path(source).resolve() == output.resolve():
        raise DatasetError(f"{output}: refusing to overwrite the input file")
    prompts = read_prompts(source, opts.question_col, opts.answer_col)
    kept, report = filter_prompts(prompts, opts)
    if not kept:
        sources = sorted({p.data_source for p in prompts})
        raise DatasetError(
            f"{source}: no rows left after filtering ({report.read} read, {report.dropped_source} dropped by "
            f"--data-source (sources present: {sources[:20]}), {report.dropped_length} by --max-prompt-chars, "
            f"{report.dropped_duplicate} duplicates)"
        )
    out = _unique_ids([apply_template(p, opts.template) for p in kept])
    write_dataset(out, output)
    report.written = len(out)
    report.output = str(output)
    for p in out:
        report.data_sources[p.data_source] = report.data_sources.get(p.data_source, 0) + 1
    log.info("prepared %d of %d prompts -> %s", report.written, report.read, output)
    return report


def summary_rows(report: PrepareReport) -> list[tuple[str, Any]]:
    """(label, value) lines for the CLI."""
    rows: list[tuple[str, Any]] = [("rows read", report.read)]
    for label, n in (
        ("dropped: data_source", report.dropped_source),
        ("dropped: too long", report.dropped_length),
        ("dropped: duplicates", report.dropped_duplicate),
    ):
        if n:
            rows.append((label, n))
    rows.append(("rows written", report.written))
    rows += [(f"  {src}", n) for src, n in sorted(report.data_sources.items())]
    return rows
