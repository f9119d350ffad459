"""Held-out evaluation during a `tbrm up` run: greedy accuracy of the weights an actor currently serves.

`eval_via_actor` asks a running actor (`POST /v1/generate`, greedy) and grades with the reward service
(`POST /v1/grade`), the same grader the training rewards come from. The response carries the policy version that
produced every answer, so each accuracy point is tied to exact weights; it costs the actor one short batch.
Offline evaluation of a model folder is `tbrm eval` (deploy/eval_protocol.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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
