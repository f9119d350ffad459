"""Held-out evaluation: greedy accuracy (and avg@k) graded with the reward service's grader.

Two ways, same grading:
- `eval_via_actor`: during a run, ask a running actor (`POST /v1/generate`, the weights it currently serves) and
  grade with the reward service (`POST /v1/grade`). The response carries the policy version that produced every
  answer, so each accuracy point is tied to exact weights. Costs the actor one short batch.
- `eval_model`: offline (`tbrm eval MODEL DATA`), an in-process vLLM engine (the actor's `ActorEngine`) on any HF
  folder, graded with `reward.grading` in this process (the same code the reward service's workers run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from actor_service.client import generate
from actor_service.schema import MAX_GENERATE_PROMPTS, GenerateRequest
from buffer.schema import Prompt
from reward.client import RewardClient
from reward.schema import GradeItem

log = logging.getLogger(__name__)


class EvalResult(BaseModel):
    """One evaluation of one set of weights on one prompt set."""

    accuracy: float
    """Greedy accuracy (fraction of prompts whose first answer is graded correct)."""
    n: int
    correct: int
    no_answer: int = 0
    policy_version: int | None = None
    """Weights version that answered (None offline)."""
    avg_at_k: float | None = None
    """Mean accuracy over k sampled answers per prompt (offline `tbrm eval --k`)."""
    k: int = 1
    latency_s: float = 0.0
    examples: list[dict[str, Any]] = Field(default_factory=list)
    """A few (question, response, gold, status) rows for eyeballing."""


def user_text(p: Prompt) -> str:
    """The prompt's last user turn (the actor adds its system prompt and chat template)."""
    users = [m["content"] for m in p.messages if m.get("role") == "user"]
    return users[-1] if users else p.messages[-1]["content"]


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
    examples = [
        {"question": user_text(p), "response": r, "gold": p.gold, "status": g.status}
        for p, r, g in list(zip(prompts, responses, results, strict=True))[:n_examples]
    ]
    return EvalResult(
        accuracy=correct / max(1, len(prompts)),
        n=len(prompts),
        correct=correct,
        no_answer=sum(r.status == "no_answer" for r in results),
        policy_version=versions.pop() if versions else None,
        latency_s=time.perf_counter() - t0,
        examples=examples,
    )


def _grade_local(response: str, gold: str) -> str:
    from reward.grading import grade_in_process  # noqa: PLC0415 (sympy/math-verify only when grading offline)

    status, _ = grade_in_process(response, gold)
    return status


def eval_model(
    model_dir: str | Path,
    prompts: Sequence[Prompt],
    *,
    k: int = 1,
    temperature: float = 1.0,
    max_tokens: int = 256,
    max_model_len: int = 1024,
    system_prompt: str | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> EvalResult:
    """Offline: greedy accuracy and, for k > 1, avg@k (k samples at `temperature`) of an HF model folder."""
    from actor_service.engine import ActorEngine  # noqa: PLC0415 (vLLM)
    from actor_service.schema import DEFAULT_SYSTEM_PROMPT  # noqa: PLC0415

    t0 = time.perf_counter()
    engine = ActorEngine(model_dir, max_model_len=max_model_len, threads=threads, seed=seed)
    try:
        sys_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        ids = [engine.chat_token_ids(p.messages, sys_prompt) for p in prompts]
        keep = [i for i, x in enumerate(ids) if engine.fits(x)]
        if len(keep) < len(ids):
            log.warning("%d prompts do not fit max_model_len=%d: counted as wrong", len(ids) - len(keep), max_model_len)
        greedy = engine.generate([ids[i] for i in keep], n=1, temperature=0.0, max_tokens=max_tokens, seed=seed)
        statuses = ["error"] * len(prompts)
        texts = [""] * len(prompts)
        for j, i in enumerate(keep):
            texts[i] = greedy.samples[j][0].text
            statuses[i] = _grade_local(texts[i], prompts[i].gold)
        correct = sum(s == "correct" for s in statuses)
        avg_k = None
        if k > 1:
            sampled = engine.generate(
                [ids[i] for i in keep], n=k, temperature=temperature, max_tokens=max_tokens, seed=seed
            )
            hits = sum(
                _grade_local(s.text, prompts[i].gold) == "correct"
                for j, i in enumerate(keep)
                for s in sampled.samples[j]
            )
            avg_k = hits / (k * max(1, len(prompts)))
    finally:
        engine.close()
    return EvalResult(
        accuracy=correct / max(1, len(prompts)),
        n=len(prompts),
        correct=correct,
        no_answer=sum(s == "no_answer" for s in statuses),
        avg_at_k=avg_k,
        k=k,
        latency_s=time.perf_counter() - t0,
        examples=[
            {"question": user_text(p), "response": t, "gold": p.gold, "status": s}
            for p, t, s in list(zip(prompts, texts, statuses, strict=True))[:3]
        ],
    )
