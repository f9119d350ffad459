"""Requests, results and small helpers of the actor's engine driver (actor_service.engine)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STALE_TEMP_PREFIX = "tbrm-actor-"
"""Temp folders earlier versions of the actor created per engine (removed at start when left by a crash)."""
STALE_TEMP_AGE_S = 3600.0


class EngineClosed(RuntimeError):
    """The engine was closed (or its request aborted) before the request finished."""


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    """Log-probability of each sampled token under the engine's (raw or processed) distribution."""
    text: str
    finish_reason: str
    version_start: int = 0
    """Policy version of the weights that sampled the first token."""
    version_end: int = 0
    """... and the last token (differs when a push was applied while the sequence ran)."""


@dataclass
class Completion:
    """The n samples of one prompt."""

    samples: list[Sample]
    latency_s: float

    @property
    def n_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass
class Generation:
    samples: list[list[Sample]]
    """One list of n samples per prompt, in input order."""
    version_start: int
    version_end: int
    latency_s: float
    n_tokens: int = field(default=0)


@dataclass
class Request:
    rid: str
    prompt_ids: list[int]
    params: Any
    on_done: Callable[[Any, BaseException | None], None]
    raw: bool = False
    """Hand vLLM's RequestOutput to on_done instead of a Completion."""
    t0: float = 0.0


@dataclass
class Call:
    fn: Callable[[], Any]
    future: Future[Any]
    deferred: bool = False
    """A weight update in between-batches mode: runs only when no request is in flight."""


def samples_of(out: Any, version: int, texts: Iterator[str]) -> list[Sample]:
    """vLLM's finished RequestOutput -> Samples; versions from its weight-version spans (`version` if none); the
    responses' texts are the next len(out.outputs) of `texts` (decoded by the caller, in order)."""
    group = []
    for comp in out.outputs:
        ids = list(comp.token_ids)
        lps = [float(entry[tok].logprob) for tok, entry in zip(ids, comp.logprobs or [], strict=True)]
        spans = comp.weight_versions or []
        first = int(spans[0].version) if spans else version
        last = int(spans[-1].version) if spans else version
        group.append(Sample(ids, lps, next(texts), comp.finish_reason or "length", first, last))
    return group


def run_call(call: Call) -> None:
    try:
        call.future.set_result(call.fn())
    except BaseException as e:  # noqa: BLE001  (raised in the caller's thread)
        call.future.set_exception(e)


def resolve(fut: Future[Any], then: Callable[[Any], Any] | None = None) -> Callable[[Any, BaseException | None], None]:
    """An engine callback that settles `fut` with the result (passed through `then`, called in the callback's
    thread) or the error."""
    def done(result: Any, error: BaseException | None) -> None:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(then(result) if then else result)

    return done


def clean_stale_temp_dirs(root: str | None = None, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove temp folders of earlier actor versions left by a crash (untouched for `max_age_s`)."""
    base = Path(root or tempfile.gettempdir())
    removed = []
    now = time.time()
    for d in base.glob(f"{STALE_TEMP_PREFIX}*"):
        try:
            if d.is_dir() and now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        except OSError:
            continue
    if removed:
        log.info("removed %d stale actor temp folders under %s", len(removed), base)
    return removed


