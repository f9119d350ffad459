"""Prompt groups of the sampling loop: what is claimed and generated, how its samples are graded and turned into
Trajectories, and catching up to an announced weights file (actor_service.loop)."""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actor_service.engine import Completion, VersionConflict, WeightsApplyError
from actor_service.weights import WeightsFormatError, WeightsMismatchError, parse_weights, read_into_memory
from buffer.client import Prompt, Trajectory
from reward.schema import MAX_GOLD_CHARS, MAX_RESPONSE_CHARS, GradeItem, GradeResult

log = logging.getLogger(__name__)


@dataclass
class Group:
    """One claimed prompt: submitted to the engine, then finished (n samples), then inserted."""

    prompt: Prompt
    ids: list[int]
    text: str = ""
    """The chat-templated prompt that `ids` tokenize (the trajectories' prompt_text)."""
    request_id: str = ""
    version: int = 0
    """Engine version when submitted (sync mode counts per version)."""
    completion: Completion | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def grade_items(groups: list[Group]) -> tuple[list[GradeItem], list[int], list[GradeResult]]:
    """The gradable samples, the slot of each in the flat sample list, and placeholder results (status "error")
    for every sample (a gold answer over MAX_GOLD_CHARS stays an error)."""
    items: list[GradeItem] = []
    slots: list[int] = []
    results: list[GradeResult] = []
    for g in groups:
        assert g.completion is not None
        for smp in g.completion.samples:
            if len(g.prompt.gold) <= MAX_GOLD_CHARS:
                # The final answer sits at the end of a response: keep the tail of an overlong one.
                items.append(GradeItem(response=smp.text[-MAX_RESPONSE_CHARS:], gold=g.prompt.gold))
                slots.append(len(results))
            results.append(GradeResult(score=0.0, status="error", extracted=None))
    return items, slots, results


def to_trajectories(groups: list[Group], results: list[GradeResult], grade_s: float, actor_id: str
                    ) -> list[Trajectory]:
    """One Trajectory per sample (a new group_id per prompt), with its grade and the versions of its tokens."""
    out: list[Trajectory] = []
    k = 0
    for g in groups:
        assert g.completion is not None
        p, group_id, prompt_text = g.prompt, uuid.uuid4().hex, g.text
        for smp in g.completion.samples:
            res = results[k]
            k += 1
            out.append(Trajectory(
                prompt_id=p.prompt_id, group_id=group_id, prompt_token_ids=g.ids,
                response_token_ids=smp.token_ids, behaviour_logprobs=smp.logprobs, prompt_text=prompt_text,
                response_text=smp.text, finish_reason=smp.finish_reason, reward=res.score,
                grade_status=res.status, extracted=res.extracted, gold=p.gold, data_source=p.data_source,
                policy_version=smp.version_start, policy_version_end=smp.version_end, actor_id=actor_id,
                gen_latency_s=g.completion.latency_s, grade_latency_s=grade_s,
            ))
    return out


def read_announced(path: Path, sha256: str, engine: Any, max_header_bytes: int) -> dict[str, Any]:
    """The tensors of an announced weights file, checked like a push (sha256, header, names/shapes/dtypes)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not readable here")
    data = read_into_memory(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise WeightsFormatError(f"sha256 of {path} is {digest}, WeightsStore says {sha256}")
    return parse_weights(data, engine.spec, engine.optional, max_header_bytes)


def catch_up(engine: Any, info: Any, failed: set[int], max_header_bytes: int) -> float | None:
    """Apply the announced weights `info` (WeightsInfo) from their file when newer than the engine's and readable
    here; returns the load seconds, or None (not newer, a push landed meanwhile, or unreadable: then the version
    joins `failed` and is not tried again)."""
    if info.version <= engine.version or info.version in failed or not info.path:
        return None
    path = Path(info.path)
    try:
        load_s = engine.apply_weights(read_announced(path, info.sha256, engine, max_header_bytes), info.version)
    except VersionConflict:
        return None  # a push landed meanwhile
    except (OSError, WeightsFormatError, WeightsMismatchError, WeightsApplyError) as e:
        failed.add(info.version)
        log.warning("cannot catch up to weights version %d from %s (%s); waiting for a push", info.version, path, e)
        return None
    log.info("caught up to weights version %d from %s", info.version, path)
    return load_s
