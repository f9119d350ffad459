"""Held-out accuracy, the one home of evaluation: live during a run, or offline on a model folder.

- **Live** (`eval_via_actor`; `tbrm up` schedules it in deploy/run_evals.py): greedy accuracy of the weights a
  running actor currently serves. It asks the actor (`POST /v1/generate`, greedy) and grades with the reward service
  (`POST /v1/grade`), the same grader the training rewards come from. The response carries the policy version that
  produced every answer, so each accuracy point is tied to exact weights; it costs the actor one short batch.
- **Offline** (`evaluate`, `tbrm eval`): the TBRM paper's protocol on several benchmarks, one engine, a mode per
  benchmark.

    tbrm eval MODEL math500.parquet aime24.jsonl amc23.jsonl --max-new-tokens 3072 --output results.json
    tbrm eval MODEL champ --max-new-tokens 256            # the 270 CHAMP problems (champ-dataset package)

Offline modes (Yuan et al. 2025, section 5):
- greedy avg@1 (temperature 0, one answer per problem) for MATH500 / Minerva / OlympiadBench-style benchmarks and
  anything not recognised;
- avg@k at temperature 1.0 (k samples per problem, accuracy averaged over all k * n answers) for AIME / AMC-style
  benchmarks, whose few problems make one greedy answer a noisy estimate (k = 32 by default).
The benchmark name is the data file's stem (or `champ`/`toy`); `--mode greedy|sampled` and `--k` override the choice
for every benchmark. Answers are graded in this process by `reward.grading.grade_in_process`, the pipeline the
reward service's workers run (the same verdicts the actors' rewards come from). The model is loaded once into the
actor's `ActorEngine` (vLLM: CPU here, CUDA on a GPU box); prompts that do not fit `max_model_len` are counted wrong
and reported.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from actor_service.client import generate
from actor_service.schema import MAX_GENERATE_PROMPTS, GenerateRequest
from buffer.schema import Prompt
from problems.toy import toy_kind
from reward.client import RewardClient
from reward.schema import GradeItem

log = logging.getLogger(__name__)

Mode = Literal["greedy", "sampled"]
SAMPLED_BENCHMARKS = ("aime", "amc")
"""Name fragments of benchmarks evaluated with avg@k at temperature 1.0 (the paper's AIME24/25, AMC23)."""
DEFAULT_SAMPLED_K = 32
CHUNK = 64
"""Prompts per engine call of an offline evaluation (the progress bar advances per chunk)."""


class Accuracy(BaseModel):
    """Graded answers of one set of weights on one prompt set."""

    accuracy: float
    """Fraction of answers graded correct: greedy, of the problems (avg@1); sampled, of k * problems (avg@k)."""
    n: int
    """Problems."""
    correct: int
    """Correct answers (over all k samples)."""
    no_answer: int = 0
    """Answers without a final boxed answer."""
    examples: list[dict[str, Any]] = Field(default_factory=list)
    """A few (question, response, gold, status) rows for eyeballing."""


class EvalResult(Accuracy):
    """One live evaluation: greedy answers of the weights an actor serves."""

    policy_version: int | None = None
    """Weights version that answered (None offline)."""
    by_kind: dict[str, list[int]] = Field(default_factory=dict)
    """[correct, problems] per kind of toy problem (`problems.toy.toy_kind`: add, add carry, sub, sub borrow);
    empty for other data. Shows which skill a plateau lacks."""
    latency_s: float = 0.0


class BenchmarkSpec(BaseModel):
    """One benchmark to evaluate offline: a name, its prompts' source and how to sample."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    """A dataset file, `champ` or `toy`."""
    mode: Mode
    k: int = Field(ge=1)
    """Samples per problem (1 for greedy)."""
    temperature: float = Field(ge=0.0)


class BenchmarkResult(Accuracy):
    """Accuracy of one benchmark (avg@k: correct answers / (k * problems))."""

    name: str
    source: str
    mode: Mode
    k: int
    temperature: float
    skipped: int = 0
    """Problems longer than max_model_len (counted wrong)."""
    pass_at_k: float | None = None
    """Fraction of problems with at least one correct sample (k > 1 only)."""
    mean_response_tokens: float = 0.0
    truncated: float = 0.0
    """Fraction of answers cut at max_new_tokens."""
    seconds: float = 0.0


class EvalReport(BaseModel):
    model: str
    max_new_tokens: int
    max_model_len: int
    system_prompt: str
    benchmarks: list[BenchmarkResult]
    seconds: float


def user_text(p: Prompt) -> str:
    """The prompt's last user turn (the actor adds its system prompt and chat template)."""
    users = [m["content"] for m in p.messages if m.get("role") == "user"]
    return users[-1] if users else p.messages[-1]["content"]


def example(p: Prompt, response: str, status: str) -> dict[str, Any]:
    return {"question": user_text(p), "response": response, "gold": p.gold, "status": status}


# ---- live: a running actor, graded by the reward service ----


def eval_via_actor(
    actor_url: str,
    reward: RewardClient,
    prompts: Sequence[Prompt],
    *,
    max_tokens: int = 32,
    timeout_s: float = 120.0,
    n_examples: int = 3,
) -> EvalResult:
    """Greedy answers from a running actor, graded by the reward service.

    Raises RuntimeError if the actor's weights changed between chunks (the result would mix versions): callers
    retry; with a few chunks and ~1 s per chunk it is rare."""
    t0 = time.perf_counter()
    responses: list[str] = []
    versions: set[int] = set()
    for i in range(0, len(prompts), MAX_GENERATE_PROMPTS):
        chunk = prompts[i : i + MAX_GENERATE_PROMPTS]
        req = GenerateRequest(prompts=[user_text(p) for p in chunk], chat=True, max_tokens=max_tokens, temperature=0.0)
        resp = generate(actor_url, req, timeout_s=timeout_s)
        versions.add(resp.policy_version)
        responses += [r.samples[0].text for r in resp.results]
    if len(versions) > 1:
        raise RuntimeError(f"weights changed during the evaluation (versions {sorted(versions)})")
    results = reward.grade([GradeItem(response=r, gold=p.gold) for r, p in zip(responses, prompts, strict=True)])
    correct = sum(r.status == "correct" for r in results)
    by_kind: dict[str, list[int]] = {}
    for p, g in zip(prompts, results, strict=True):
        if (kind := toy_kind(user_text(p))) is not None:
            tally = by_kind.setdefault(kind, [0, 0])
            tally[0] += g.status == "correct"
            tally[1] += 1
    rows = list(zip(prompts, responses, results, strict=True))[:n_examples]
    return EvalResult(
        accuracy=correct / max(1, len(prompts)),
        n=len(prompts),
        correct=correct,
        no_answer=sum(r.status == "no_answer" for r in results),
        policy_version=versions.pop() if versions else None,
        by_kind=by_kind,
        latency_s=time.perf_counter() - t0,
        examples=[example(p, r, g.status) for p, r, g in rows],
    )


# ---- offline: a model folder, the paper's protocol ----


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
    from problems.champ import load_champ
    from problems.files import load_dataset
    from problems.toy import toy_splits

    if source == "champ":
        prompts = load_champ()
    elif source == "toy":
        prompts = toy_splits()[1]
    else:
        prompts = load_dataset(source)
    return prompts[:limit] if limit else prompts


def grade(response: str, gold: str) -> str:
    """Status of one answer (correct/incorrect/no_answer/...), as the reward service grades it."""
    from reward.grading import grade_in_process  # sympy/math-verify only when grading

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
    from actor_service.engine import ActorEngine  # vLLM
    from actor_service.schema import DEFAULT_SYSTEM_PROMPT

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
    ids = engine.chat_token_ids_batch([p.messages for p in prompts], sys_prompt)
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
                    examples.append(example(prompts[i], s.text, status))
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


def evaluate_on_console(model: str, specs: Sequence[BenchmarkSpec], console: Any, **engine: Any) -> EvalReport:
    """`evaluate` with a progress bar per benchmark, then the results table (what `tbrm eval` shows)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:  # fmt: skip
        tasks: dict[str, Any] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        report = evaluate(model, specs, progress=progress, **engine)
    table = Table(title=f"{model}  (max {report.max_new_tokens} new tokens, {report.seconds:.0f} s)")
    for col in ("benchmark", "metric", "accuracy", "problems", "no answer", "truncated", "mean tokens", "seconds"):
        table.add_column(col, justify="left" if col in ("benchmark", "metric") else "right")
    for b in report.benchmarks:
        metric = "avg@1 (greedy)" if b.mode == "greedy" else f"avg@{b.k} (T={b.temperature:g})"
        table.add_row(b.name, metric, f"{100 * b.accuracy:.1f}", str(b.n), str(b.no_answer),
                      f"{100 * b.truncated:.0f}%", f"{b.mean_response_tokens:.0f}", f"{b.seconds:.0f}")  # fmt: skip
    console.print(table)
    return report
