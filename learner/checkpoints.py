"""What the learner keeps so that a crash at any moment loses nothing and issues no version twice.

Checkpoints (`save_checkpoint`, `latest_checkpoint`): DeepSpeed's checkpoint (model, optimizer, LR scheduler) with
step/policy_version in its client state, then every rank's RNG state (JSON), and only then the `latest` pointer
(written atomically by rank 0). A crash at any point of a save leaves `latest` on the previous complete checkpoint.
Old checkpoints are pruned by the order they were written, never the one just written: a run directory that still
holds higher-step tags of an earlier run (`resume = "never"`, a wiped Redis) must not lose the new checkpoint.

Version numbers (`repair_version`, `next_version`): a version names one set of weights for the whole life of the
Redis state. Whatever the learner restarts from (a checkpoint that is older than the last export, no checkpoint
after a crash before the first one, `resume = "never"`, a wiped run directory while Redis persists), it continues
numbering after the newest version that was published, that a live actor holds, or that its training log shows
assigned to a step (the export of a step runs behind it, so a crash can cut it short). During the run, an actor that
answers 409 (it holds a version >= ours) or reports a newer version makes the next version jump past it.

The training log (`TrainingLog`, `<run_dir>/trained.jsonl`, rank 0): one JSON line per start, per step (the item
ids it trained on and their policy versions, the leases) and per checkpoint. Two readers:
- a resumed learner (`StalenessRecovery`): the items of the steps after its checkpoint were trained but not acked
  (learner/acks.py), so their leases expire and they return to the buffer. The crash raised the learner's
  version (above) while they waited, so the table's staleness filter would drop them as too old and the batches
  would be lost. Until each of them is trained again (or has left the buffer) the learner samples with its
  version capped at min(policy_version) + max_staleness_versions of those items.
- the chaos audit (bench/chaos.py): which trajectory was trained by which step, and which steps a crash rolled
  back (those after the checkpoint the next start resumed from), so "nothing trained twice" can be checked.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from buffer.client import ActorRegistry, ReplayTable
from buffer.schema import SampledItem, WeightsInfo

log = logging.getLogger(__name__)

TRAINING_LOG = "trained.jsonl"
TAG_PREFIX = "step-"


# ------------------------------------------------------------------------------------------------------------------
# RNG state and checkpoints
# ------------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON (no pickle in checkpoints we write ourselves)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """Tag of the newest complete checkpoint (`latest` moves only after a save finished), None if there is none."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int, version: int, rank: int, keep: int) -> str:
    """DeepSpeed checkpoint + step/version + every rank's RNG state, then `latest`, then pruning (rank 0)."""
    tag = f"{TAG_PREFIX}{step:08d}"
    # save_latest=False: DeepSpeed would point `latest` at the tag before our RNG files exist
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "policy_version": version},
                           save_latest=False)
    (ckpt_dir / tag / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")  # atomic: a reader sees the old tag or the new one
        prune_checkpoints(ckpt_dir, keep, current=tag)
    log.info("checkpoint %s saved", tag)
    return tag


def prune_checkpoints(ckpt_dir: Path, keep: int, current: str) -> list[str]:
    """Delete all but the `keep` most recently written checkpoints; `current` (just written) always stays.

    Write order, not tag order: tags of an earlier run with higher step numbers would otherwise outrank the
    checkpoint just written and `latest` would point at a deleted directory."""
    others = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name != current]
    others.sort(key=lambda p: p.stat().st_mtime_ns)
    doomed = others[: max(0, len(others) - (keep - 1))]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in doomed]


# ------------------------------------------------------------------------------------------------------------------
# Version numbers
# ------------------------------------------------------------------------------------------------------------------


def repair_version(
    version: int, published: WeightsInfo | None, actor_versions: Iterable[int], world: int = 1, logged: int = 0
) -> int:
    """The version the learner continues from: `version` (from its checkpoint, 0 without one) unless a newer one
    was already published, is held by an actor or was assigned to a step by an earlier incarnation (`logged`, from
    the training log: a step whose export the crash cut short, or that reached an actor whose heartbeat has not
    said so yet); then one above the newest (never reuse a number for other weights). An equal number is the
    checkpoint's own export. With several ranks, rank 0's answer wins."""
    floor = max([published.version if published is not None else 0, *actor_versions, logged])
    fixed = floor + 1 if floor > version else version
    if fixed != version:
        log.warning(
            "restarting at policy_version %d but version %d was already published, held by an actor or assigned "
            "before the restart: continuing at %d", version, floor, fixed,
        )
    if world > 1:
        box = [fixed]
        torch.distributed.broadcast_object_list(box, src=0)
        fixed = int(box[0])
    return fixed


def live_actor_versions(registry: ActorRegistry) -> list[int]:
    """The versions the live actors report (for `repair_version`); [] if the registry cannot be read."""
    try:
        return [a.policy_version for a in registry.live()]
    except Exception as e:  # noqa: BLE001  (Redis hiccup: the published record alone still guards the numbering)
        log.warning("cannot read the actor registry for version repair: %s", e)
        return []


def next_version(version: int, floor: int) -> int:
    """The version after an optimizer step: version + 1, or one above `floor` (the newest version an actor was
    seen holding, `WeightPusher.version_floor`) when an actor is ahead of this learner."""
    if floor >= version + 1:
        log.warning("an actor holds version %d >= %d: the next version is %d", floor, version + 1, floor + 1)
        return floor + 1
    return version + 1


# ------------------------------------------------------------------------------------------------------------------
# The training log and the staleness recovery after a crash
# ------------------------------------------------------------------------------------------------------------------


class TrainingLog:
    """Append-only JSON lines of starts, trained steps and checkpoints (rank 0; see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / TRAINING_LOG
        # a SIGKILL mid-write leaves a line without its newline: end it, so the next record stays readable
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
            if cut:
                with self.path.open("a") as f:
                    f.write("\n")

    def _write(self, rec: dict[str, Any], sync: bool = False) -> None:
        # opened per record: a line is complete on disk before the step it describes is acked or checkpointed
        with self.path.open("a") as f:
            f.write(json.dumps({**rec, "time": time.time(), "pid": os.getpid()}) + "\n")
            if sync:
                f.flush()
                os.fsync(f.fileno())

    def start(self, step: int, version: int, tag: str | None) -> None:
        self._write({"event": "start", "step": step, "version": version, "resumed_from": tag}, sync=True)

    def step(self, step: int, version: int, items: list[SampledItem], leases: list[str]) -> None:
        self._write({"event": "step", "step": step, "version": version, "leases": leases,
                     "items": [it.info.item_id for it in items],
                     "policy_versions": [it.trajectory.policy_version for it in items]})

    def checkpoint(self, step: int, version: int) -> None:
        self._write({"event": "checkpoint", "step": step, "version": version}, sync=True)


def read_training_log(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a training log (a line cut short by a SIGKILL is skipped)."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def logged_version(records: list[dict[str, Any]]) -> int:
    """The newest version a training log shows assigned (to a step, or to a start's weights); 0 for none."""
    return max((int(r["version"]) for r in records if r.get("event") in ("step", "start") and "version" in r),
               default=0)


def rolled_back_items(records: list[dict[str, Any]], resumed_step: int) -> dict[str, int]:
    """item_id -> policy_version of the items trained after the last checkpoint (steps > `resumed_step`): their
    updates were lost with the crash and their leases were never acked."""
    last_ckpt = max((i for i, r in enumerate(records) if r.get("event") == "checkpoint"), default=-1)
    window: dict[str, int] = {}
    for r in records[last_ckpt + 1:]:
        if r.get("event") == "step" and int(r["step"]) > resumed_step:
            window.update(zip(r["items"], (int(v) for v in r["policy_versions"]), strict=True))
    return window


class StalenessRecovery:
    """Caps the learner version used for sampling while rolled-back items wait to be trained again."""

    RECHECK_S = 5.0
    """How often the items not seen again are looked up in the table (they may have been evicted)."""

    def __init__(self, table: ReplayTable, window: dict[str, int], max_staleness: int | None) -> None:
        self.table = table
        self.window = dict(window) if max_staleness is not None else {}
        self.max_staleness = max_staleness
        self._checked_at = time.monotonic()
        if self.window:
            log.info("%d items of rolled-back steps return to the buffer when their leases expire; sampling "
                     "keeps them within max_staleness_versions=%d until they are trained again",
                     len(self.window), max_staleness)

    def sampling_version(self, version: int) -> int:
        """The learner version to sample with: `version`, capped while rolled-back items are pending."""
        if not self.window:
            return version
        if time.monotonic() - self._checked_at > self.RECHECK_S:
            self._checked_at = time.monotonic()
            try:
                gone = [i for i in self.window if self.table.get(i) is None]
            except Exception as e:  # noqa: BLE001  (Redis away: keep the cap, look again later)
                log.warning("cannot look up rolled-back items: %s", e)
                gone = []
            for i in gone:
                del self.window[i]
            if not self.window:
                log.info("every rolled-back item was trained again or left the buffer: staleness cap lifted")
                return version
        assert self.max_staleness is not None
        return min(version, min(self.window.values()) + self.max_staleness)

    def seen(self, items: list[SampledItem]) -> None:
        """Items sampled again leave the window."""
        for it in items:
            self.window.pop(it.info.item_id, None)
