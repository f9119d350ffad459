"""The books of a chaos run (bench/chaos.py), checked from what the run left behind. Pure functions, unit-tested.

Inputs: the replay table's stats and lease/claim records from the run's Redis (reopened from its AOF), the
learner's training log (`<run>/learner/trained.jsonl`, learner/checkpoints.py), the published-weights and actor
versions polled during the run, the kill log and the run summary.

The documented rollback windows (README "Reliability"), the only ways a trajectory may be trained twice with
`max_times_sampled = 1`:
- learner crash: the steps after its last checkpoint are rolled back; their batches were never acked and are
  trained again by the resumed learner (they do not count: only checkpointed steps are "effective");
- learner crash between a checkpoint and its acks (milliseconds): the checkpoint holds the update but the leases
  expire and the batch is trained again; recognised when the learner's next record is a new start;
- Redis SIGKILL with `appendfsync everysec`: up to ~1 s of writes (a lease, an ack) are lost; recognised when a
  Redis kill falls while the item was in flight (from `IN_FLIGHT_SLACK_S` before its step to 2 s after its
  checkpoint).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

IN_FLIGHT_SLACK_S = 15.0
"""How long before its step record an item may have been sampled (sampling + reference + step time)."""
REDIS_LOSS_S = 2.0
"""Writes lost by a Redis SIGKILL under appendfsync everysec: 1 s, plus slack for the ack after a checkpoint."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Trainings:
    """The learner's log replayed: checkpointed ("effective") trainings per item, and rolled-back ones."""

    effective: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    rolled_back: Counter[str] = field(default_factory=Counter)
    died_after_checkpoint: set[int] = field(default_factory=set)
    """Indexes of checkpoint records followed directly by a new start (crash before the acks finished)."""


def replay_training_log(records: list[dict[str, Any]]) -> Trainings:
    out = Trainings()
    uncommitted: list[dict[str, Any]] = []

    def commit(steps: list[dict[str, Any]], idx: int, at: float) -> None:
        for s in steps:
            for item in s["items"]:
                out.effective[item].append({"step": s["step"], "time": s["time"], "ckpt_time": at, "ckpt": idx})

    for i, r in enumerate(records):
        ev = r.get("event")
        if ev == "step":
            uncommitted.append(r)
        elif ev == "checkpoint":
            commit(uncommitted, i, r["time"])
            uncommitted = []
            if i + 1 < len(records) and records[i + 1].get("event") == "start":
                out.died_after_checkpoint.add(i)
        elif ev == "start":
            resumed = int(r["step"]) if r.get("resumed_from") else -1
            # a checkpoint whose log record the kill cut off still counts (the new start resumed from it)
            commit([s for s in uncommitted if s["step"] <= resumed], i, r["time"])
            for s in uncommitted:
                if s["step"] > resumed:
                    out.rolled_back.update(s["items"])
            uncommitted = []
    for s in uncommitted:
        out.rolled_back.update(s["items"])
    return out


def audit_trained_once(tr: Trainings, redis_kills: list[float], everysec: bool) -> tuple[Check, dict[str, int]]:
    """No trajectory trained twice (effective trainings) beyond the documented windows."""
    why: Counter[str] = Counter()
    bad: list[str] = []
    for item, runs in tr.effective.items():
        for first, _again in zip(runs, runs[1:], strict=False):
            if first["ckpt"] in tr.died_after_checkpoint:
                why["crash_between_checkpoint_and_ack"] += 1
            elif everysec and any(first["time"] - IN_FLIGHT_SLACK_S <= k <= first["ckpt_time"] + REDIS_LOSS_S
                                  for k in redis_kills):
                why["redis_aof_everysec_loss"] += 1
            else:
                bad.append(item)
    n = sum(len(v) for v in tr.effective.values())
    facts = {"effective_trainings": n, "items_trained": len(tr.effective),
             "rolled_back_trainings": sum(tr.rolled_back.values()), **{f"twice_{k}": v for k, v in why.items()}}
    detail = (f"{n} checkpointed trainings of {len(tr.effective)} items; {facts['rolled_back_trainings']} rolled "
              f"back; twice within a documented window: {dict(why) or 0}; twice otherwise: {len(bad)}")
    return Check("no trajectory trained twice", not bad, detail + (f" e.g. {bad[:3]}" if bad else "")), facts


def audit_books(stats: dict[str, Any]) -> Check:
    """inserts == stored + consumed + evicted + dropped_stale, and every ack consumed its item (max_times = 1)."""
    extra = stats.get("extra", {})
    consumed = int(extra.get("consumed", stats["acks"]))
    parts = stats["size"] + consumed + stats["removed"] + stats["dropped_stale"]
    ok = stats["inserts"] == parts and stats["acks"] == consumed
    return Check("every inserted trajectory accounted for", ok,
                 f"inserts {stats['inserts']} = stored {stats['size']} (leased {stats['leased']}) + consumed "
                 f"{consumed} + evicted {stats['removed']} + dropped_stale {stats['dropped_stale']} (= {parts}); "
                 f"acks {stats['acks']}")


def audit_learner_versions(records: list[dict[str, Any]]) -> Check:
    """Step versions strictly increase across all incarnations; a start never goes below what was issued (equal
    only to the version of the checkpoint it resumed from: the same weights)."""
    issued = -1
    ckpt_version: dict[int, int] = {}
    bad: list[str] = []
    for r in records:
        ev, v = r.get("event"), int(r.get("version", -1))
        if ev == "step":
            if v <= issued:
                bad.append(f"step {r['step']} v{v} after v{issued}")
            issued = max(issued, v)
        elif ev == "checkpoint":
            ckpt_version[int(r["step"])] = v
        elif ev == "start" and issued >= 0:
            same = r.get("resumed_from") and ckpt_version.get(int(r["step"])) == v == issued
            if v < issued or (v == issued and not same):
                bad.append(f"start at v{v} after v{issued} was issued")
    starts = sum(r.get("event") == "start" for r in records)
    return Check("learner versions never go backwards or repeat", not bad,
                 f"{starts} learner starts, last version v{issued}" + (f"; {bad[:3]}" if bad else ""))


def audit_published(polls: list[dict[str, Any]], redis_kills: list[float], everysec: bool) -> Check:
    """Each published version has one sha256; the published version never decreases (except right after a Redis
    kill under appendfsync everysec, which may lose the last second)."""
    sha: dict[int, str] = {}
    bad: list[str] = []
    prev = None
    for p in polls:
        v = p["version"]
        if sha.setdefault(v, p["sha256"]) != p["sha256"]:
            bad.append(f"v{v} published with two different sha256")
        if prev is not None and v < prev["version"]:
            excused = everysec and any(prev["t"] - REDIS_LOSS_S <= k <= p["t"] for k in redis_kills)
            if not excused:
                bad.append(f"published v{prev['version']} -> v{v}")
        prev = p
    return Check("published versions unique and monotone", not bad,
                 f"{len(sha)} versions seen in {len(polls)} polls" + (f"; {bad[:3]}" if bad else ""))


def audit_actor_versions(metrics: list[dict[str, Any]]) -> Check:
    """Per actor incarnation (a restart starts over on the base weights) the applied version never decreases."""
    last: dict[str, tuple[int, int]] = {}
    bad: list[str] = []
    for rec in metrics:
        restarts = rec.get("restarts") or {}
        for actor, v in (rec.get("actor_versions") or {}).items():
            if v is None:
                continue
            inc = int(restarts.get(actor, 0))
            if actor in last and last[actor][0] == inc and v < last[actor][1]:
                bad.append(f"{actor} v{last[actor][1]} -> v{v} at {rec.get('wall_s')}s")
            last[actor] = (inc, v)
    return Check("actor versions never go backwards", not bad,
                 f"{len(last)} actors, last {dict((a, v) for a, (_, v) in last.items())}" + (f"; {bad[:3]}" if bad
                                                                                            else ""))


def audit_stranded(leases: dict[str, float], claims: dict[str, float], now: float, lease_s: float,
                   prompt_lease_s: float, orphans: int) -> Check:
    """No lease or prompt claim that would never return: each has an expiry no further than one term ahead, and
    no leased item points at a missing lease."""
    far = [k for k, t in leases.items() if t > now + lease_s + 1] + \
          [k for k, t in claims.items() if t > now + prompt_lease_s + 1]
    ok = not far and orphans == 0
    return Check("no lease or prompt claim stranded", ok,
                 f"{len(leases)} leases and {len(claims)} claims left, all expiring within a term; {orphans} leased "
                 f"items without a lease" + (f"; beyond a term: {far[:3]}" if far else ""))


def audit_accuracy(summary: dict[str, Any]) -> Check:
    a, b = summary.get("initial_accuracy"), summary.get("final_accuracy")
    ok = a is not None and b is not None and b > a
    return Check("held-out accuracy rises", ok, f"{a} -> {b}")


def audit_kills(kills: list[dict[str, Any]], min_total: int, min_each: int) -> Check:
    done = [k for k in kills if k.get("killed")]
    per = Counter(k["group"] for k in done)
    ok = len(done) >= min_total and all(per.get(g, 0) >= min_each for g in ("actor", "learner", "reward", "redis"))
    return Check("kills", ok, f"{len(done)} SIGKILLs (wanted >= {min_total}, >= {min_each} each): {dict(per)}")
