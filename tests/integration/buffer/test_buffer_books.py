"""Replay bookkeeping against a real redis-server: max-priority entry of new items, batched priority updates,
the "never trained" counters and the books (inserts = size + consumed + removed + dropped_stale)."""

from __future__ import annotations

import random

import pytest
import redis

from buffer.client import ReplayTable, Trajectory, connect
from buffer.schema import PrioritizedSampler, TableConfig


def traj(i: int, version: int = 0) -> Trajectory:
    return Trajectory(
        traj_id=f"t{i:05d}", prompt_id=f"p{i}", group_id="g", prompt_token_ids=[1, 2, 3],
        response_token_ids=[4, 5], behaviour_logprobs=[-0.5, -0.5], reward=0.0, grade_status="incorrect",
        policy_version=version,
    )


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return connect(redis_url)


def prio_table(r: redis.Redis, **kw) -> ReplayTable:
    return ReplayTable(r, TableConfig(sampler=PrioritizedSampler(exponent=1.0), **kw))


def priority(t: ReplayTable, item_id: str) -> float:
    got = t.get(item_id)
    assert got is not None
    return got[1]["priority"]


def test_new_items_enter_at_the_largest_priority_ever_set(r: redis.Redis) -> None:
    t = prio_table(r, max_times_sampled=0)
    t.insert([traj(0)])
    assert priority(t, "t00000") == 1.0  # nothing set yet
    t.insert([traj(1), traj(2)], priorities=[0.5, 7.0])
    t.insert([traj(3)])
    assert priority(t, "t00003") == 7.0
    t.update_priorities({"t00001": 20.0, "t00002": 0.1})
    t.insert([traj(4)])
    assert priority(t, "t00004") == 20.0
    # the maximum is over priorities ever set: lowering every priority does not lower it
    t.update_priorities({"t00001": 0.2, "t00003": 0.2, "t00004": 0.2})
    t.insert([traj(5)])
    assert priority(t, "t00005") == 20.0
    assert t.stats().extra["max_priority"] == 20.0
    # the new item carries that mass in the sum tree: P = 20 / total
    total = 1.0 + 0.2 + 0.1 + 0.2 + 0.2 + 20.0
    seen = {}
    for _ in range(40):
        b = t.sample(1, 0)
        seen[b.items[0].info.item_id] = b.items[0].info.probability
        t.ack(b.lease_id)
    assert seen["t00005"] == pytest.approx(20.0 / total)


def test_batched_priority_update_keeps_the_sum_tree_exact(r: redis.Redis) -> None:
    rng = random.Random(3)
    t = prio_table(r, max_size=100, max_times_sampled=0)
    ps = [rng.uniform(0.1, 5.0) for _ in range(60)]
    t.insert([traj(i) for i in range(60)], priorities=ps)
    b = t.sample(5, 0)  # leased: their leaves are 0 while out
    leased = {it.info.item_id for it in b.items}
    new = {f"t{i:05d}": rng.uniform(0.0, 9.0) for i in rng.sample(range(60), 40)}
    t.update_priorities(new)
    cur = {f"t{i:05d}": new.get(f"t{i:05d}", ps[i]) for i in range(60)}
    root = float(r.hget(t.keys.tree, 1))
    assert root == pytest.approx(sum(p for k, p in cur.items() if k not in leased), rel=1e-12)
    t.ack(b.lease_id)  # back in the pool with their (possibly updated) priorities
    root = float(r.hget(t.keys.tree, 1))
    assert root == pytest.approx(sum(cur.values()), rel=1e-12)
    b = t.sample(1, 0)
    info = b.items[0].info
    assert info.probability == pytest.approx(cur[info.item_id] / sum(cur.values()), rel=1e-9)


def test_never_trained_counters_and_books(r: redis.Redis) -> None:
    t = ReplayTable(r, TableConfig(max_size=5, max_times_sampled=1, max_staleness_versions=2))
    t.insert([traj(i, version=0) for i in range(3)])
    b = t.sample(2, learner_version=0)  # t0, t1 handed out
    assert t.ack(b.lease_id, ["t00000"]) == 1  # t0 consumed
    t.insert([traj(i, version=5) for i in range(3, 8)])  # evicts t1 (sampled, leased) and t2 (never sampled)
    s = t.stats()
    assert (s.size, s.removed, s.consumed, s.removed_unsampled, s.sampled_distinct) == (5, 2, 1, 1, 2)
    t.insert([traj(8, version=1)])  # evicts t3, never sampled
    b = t.sample(1, learner_version=4)  # t8 is stale (4 - 1 > 2): dropped, never sampled
    s = t.stats()
    assert (s.removed, s.dropped_stale, s.removed_unsampled, s.sampled_distinct) == (3, 1, 3, 3)
    assert s.inserts == s.size + s.consumed + s.removed + s.dropped_stale
    t.ack(b.lease_id)
    s = t.stats()
    assert s.inserts == s.size + s.consumed + s.removed + s.dropped_stale == 9
    assert s.samples == 3 and s.acks == 2


def test_staleness_may_be_off(r: redis.Redis) -> None:
    t = ReplayTable(r, TableConfig(max_staleness_versions=None))
    t.insert([traj(0, version=0)])
    b = t.sample(1, learner_version=10**6)
    assert b.items[0].info.age_versions == 10**6 and t.stats().dropped_stale == 0
