"""The TBRM paper's evaluation protocol for `tbrm eval`: several benchmarks, one engine, per-benchmark mode.

    tbrm eval MODEL math500.parquet aime24.jsonl amc23.jsonl --max-new-tokens 3072 --output results.json
    tbrm eval MODEL champ --max-new-tokens 256            # the 270 CHAMP problems (champ-dataset package)

Modes (Yuan et al. 2025, section 5):
- greedy avg@1 (temperature 0, one answer per problem) for MATH500 / Minerva / OlympiadBench-style benchmarks and
  anything not recognised;
- avg@k at temperature 1.0 (k samples per problem, accuracy averaged over all k * n answers) for AIME / AMC-style
  benchmarks, whose few problems make one greedy answer a noisy estimate (k = 32 by default).
The benchmark name is the data file's stem (or `champ`/`toy`); `--mode greedy|sampled` and `--k` override the choice
for every benchmark. Answers are graded in this process by `reward.grading.grade_in_process`, the pipeline the
reward service's workers run (the same verdicts the actors' rewards come from).

The model is loaded once into the actor's `ActorEngine` (vLLM: CPU here, CUDA on a GPU box); prompts that do not
fit `max_model_len` are counted wrong and reported.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from buffer.schema import Prompt

log = logging.getLogger(__name__)

Mode = Literal["greedy", "sampled"]
SAMPLED_BENCHMARKS = ("aime", "amc")
"""Name fragments of benchmarks evaluated with avg@k at temperature 1.0 (the paper's AIME24/25, AMC23)."""
DEFAULT_SAMPLED_K = 32
CHUNK = 64
"""Prompts per engine call (the progress bar advances per chunk)."""


class BenchmarkSpec(BaseModel):
    """One benchmark to evaluate: a name, its prompts' source and how to sample."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    """A dataset file, `champ` or `toy`."""
    mode: Mode
    k: int = Field(ge=1)
    """Samples per problem (1 for greedy)."""
    temperature: float = Field(ge=0.0)


class BenchmarkResult(BaseModel):
    """Accuracy of one benchmark (avg@k: correct answers / (k * problems))."""

    name: str
    source: str
    mode: Mode
    k: int
    temperature: float
    n: int
    """Problems."""
    accuracy: float
    """avg@k (greedy: avg@1, the fraction of problems answered correctly)."""
    correct: int
    """Correct answers over all k samples."""
    no_answer: int
    """Answers without a final boxed answer."""
    skipped: int = 0
    """Problems longer than max_model_len (counted wrong)."""
    pass_at_k: float | None = None
    """Fraction of problems with at least one correct sample (k > 1 only)."""
    mean_response_tokens: float = 0.0
    truncated: float = 0.0
    """Fraction of answers cut at max_new_tokens."""
    seconds: float = 0.0
    examples: list[dict[str, Any]] = Field(default_factory=list)


class EvalReport(BaseModel):
    model: str
    max_new_tokens: int
    max_model_len: int
    system_prompt: str
    benchmarks: list[BenchmarkResult]
    seconds: float


def default_mode(name: str) -> tuple[Mode, int, float]:
    """(mode, k, temperature) the paper uses for a benchmark called `name`."""
    low = name.lower()
    if any(tag in low for tag in SAMPLED_BENCHMARKS):
        return "sampled", DEFAULT_SAMPLED_K, 1.0
    return "greedy", 1, 0.0


def benchmark_specs(
    sources: Sequence[str], *, mode: Mode | None = None, k: int | None = None, temperature: float | None = None
) -> list[BenchmarkSpec]:
    """Specs for data sources (files, `champ`, `toy`), with optional overrides of mode, k and temperature.

    `k` alone on a benchmark that would be greedy keeps it greedy (k applies to sampled benchmarks); `mode=sampled`
    without `k` uses the default k. Benchmark names are file stems, made unique with a suffix when they repeat."""
    specs: list[BenchmarkSpec] = []
    names: set[str] = set()
    for src in sources:
        name = src if src in ("champ", "toy") else Path(src).stem
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.add(name)
        m, kk, temp = default_mode(name)
        if mode is not None:
            m = mode
            kk, temp = (1, 0.0) if m == "greedy" else (DEFAULT_SAMPLED_K, 1.0)
        if m == "sampled":
            kk = k if k is not None else kk
            temp = temperature if temperature is not None else temp
        specs.append(BenchmarkSpec(name=name, source=src, mode=m, k=kk, temperature=temp))
    return specs


def load_benchmark(source: str, limit: int | None = None) -> list[Prompt]:
    from problems.champ import load_champ  # noqa: PLC0415
    from problems.files import load_dataset  # noqa: PLC0415
    from problems.toy import toy_splits  # noqa: PLC0415

    if source == "champ":
        prompts = load_champ()
    elif source == "toy":
        prompts = toy_splits()[1]
    else:
        prompts = load_dataset(source)
    return prompts[:limit] if limit else prompts


def grade(response: str, gold: str) -> str:
    """Status of one answer (correct/incorrect/no_answer/...), as the reward service grades it."""
    from reward.grading import grade_in_process  # noqa: PLC0415 (sympy/math-verify only when grading)

    status, _ = grade_in_process(response, gold)
    return status


ProgressFn = Callable[[str, int, int], None]
"""progress(benchmark name, answers done, answers total)."""


def evaluate(
    model_dir: str | Path,
    specs: Sequence[BenchmarkSpec],
    *,
    max_new_tokens: int = 1024,
    max_model_len: int | None = None,
    limit: int | None = None,
    system_prompt: str | None = None,
    dtype: str = "float32",
    kv_cache_bytes: int | None = 256 * 2**20,
    gpu_memory_utilization: float = 0.9,
    threads: int | None = None,
    seed: int = 0,
    n_examples: int = 3,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Evaluate one model folder on every benchmark with one vLLM engine; see the module docstring."""
    from actor_service.engine import ActorEngine  # noqa: PLC0415 (vLLM)
    from actor_service.schema import DEFAULT_SYSTEM_PROMPT  # noqa: PLC0415

    data = {s.name: load_benchmark(s.source, limit) for s in specs}  # bad files fail before the engine loads
    t0 = time.perf_counter()
    max_len = max_model_len or max_new_tokens + 1024
    engine = ActorEngine(
        model_dir, dtype=dtype, max_model_len=max_len, kv_cache_bytes=kv_cache_bytes,
        gpu_memory_utilization=gpu_memory_utilization, seed=seed, threads=threads,
    )
    sys_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    results = []
    try:
        for spec in specs:
            results.append(
                _run_benchmark(engine, spec, data[spec.name], sys_prompt, max_new_tokens, seed, n_examples, progress)
            )
    finally:
        engine.close()
    return EvalReport(
        model=str(model_dir), max_new_tokens=max_new_tokens, max_model_len=max_len, system_prompt=sys_prompt,
        benchmarks=results, seconds=time.perf_counter() - t0,
    )


def _run_benchmark(
    engine: Any, spec: BenchmarkSpec, prompts: list[Prompt], sys_prompt: str, max_new_tokens: int, seed: int,
    n_examples: int, progress: ProgressFn | None,
) -> BenchmarkResult:
    t0 = time.perf_counter()
    ids = [engine.chat_token_ids(p.messages, sys_prompt) for p in prompts]
    keep = [i for i, x in enumerate(ids) if engine.fits(x)]
    if len(keep) < len(ids):
        log.warning("%s: %d prompts do not fit max_model_len=%d: counted as wrong", spec.name, len(ids) - len(keep),
                    engine.max_model_len)  # fmt: skip
    total = len(prompts) * spec.k
    hits = [0] * len(prompts)
    statuses: dict[str, int] = {}
    n_tokens = n_truncated = done = 0
    examples: list[dict[str, Any]] = []
    if progress:
        progress(spec.name, 0, total)
    for start in range(0, len(keep), CHUNK):
        chunk = keep[start : start + CHUNK]
        gen = engine.generate(
            [ids[i] for i in chunk], n=spec.k, temperature=spec.temperature, max_tokens=max_new_tokens, seed=seed
        )
        for i, group in zip(chunk, gen.samples, strict=True):
            for s in group:
                status = grade(s.text, prompts[i].gold)
                statuses[status] = statuses.get(status, 0) + 1
                hits[i] += status == "correct"
                n_tokens += len(s.token_ids)
                n_truncated += s.finish_reason == "length"
                if len(examples) < n_examples:
                    examples.append({"question": prompts[i].messages[-1]["content"], "response": s.text,
                                     "gold": prompts[i].gold, "status": status})  # fmt: skip
        done += len(chunk) * spec.k
        if progress:
            progress(spec.name, done, total)
    answers = max(1, len(keep) * spec.k)
    correct = sum(hits)
    return BenchmarkResult(
        name=spec.name, source=spec.source, mode=spec.mode, k=spec.k, temperature=spec.temperature,
        n=len(prompts), accuracy=correct / max(1, total), correct=correct,
        no_answer=statuses.get("no_answer", 0), skipped=len(prompts) - len(keep),
        pass_at_k=(sum(h > 0 for h in hits) / max(1, len(prompts))) if spec.k > 1 else None,
        mean_response_tokens=n_tokens / answers, truncated=n_truncated / answers,
        seconds=time.perf_counter() - t0, examples=examples,
    )


def write_report(report: EvalReport, path: str | Path) -> None:
    """The report as JSON (with a `summary` map name -> accuracy for scripts)."""
    data = report.model_dump(mode="json")
    data["summary"] = {b.name: b.accuracy for b in report.benchmarks}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
