"""ReplayTable semantics against a real redis-server: every rule of the buffer module docstring."""

from __future__ import annotations

import collections
import json
import re
import threading
import time

import pytest
import redis

from buffer.client import RateLimitTimeout, ReplayTable, TableConfigMismatch, Trajectory, connect
from buffer.schema import (
    FifoSampler,
    LifoSampler,
    PrioritizedSampler,
    RateLimiterConfig,
    TableConfig,
    UniformSampler,
)
from buffer.table_types import split_meta


def traj(i: int, version: int = 0, reward: float = 0.0, actor: str = "a0", n: int = 4) -> Trajectory:
    return Trajectory(
        traj_id=f"t{i:05d}", prompt_id=f"p{i}", group_id=f"g{i // 4}", prompt_token_ids=[1, 2, 3],
        response_token_ids=list(range(n)), behaviour_logprobs=[-0.5] * n, reward=reward,
        grade_status="correct" if reward > 0 else "incorrect", policy_version=version, actor_id=actor,
    )


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return connect(redis_url)


def make(r: redis.Redis, **kw) -> ReplayTable:
    return ReplayTable(r, TableConfig(**kw))


def test_insert_sample_ack_with_metadata(r: redis.Redis) -> None:
    t = make(r, max_size=100)
    ids = t.insert([traj(i, version=2) for i in range(5)])
    assert ids == [f"t{i:05d}" for i in range(5)]
    b = t.sample(3, learner_version=5)
    assert [it.info.item_id for it in b.items] == ids[:3]  # fifo: oldest first
    for it in b.items:
        assert it.info.times_sampled == 1 and it.info.age_versions == 3 and it.info.buffer_size == 5
        want = traj(int(it.info.item_id[1:]), version=2)
        assert it.trajectory.model_dump(exclude={"created_at"}) == want.model_dump(exclude={"created_at"})
        assert it.info.inserted_at == pytest.approx(time.time(), abs=5)
    assert b.lease_expires_at == pytest.approx(time.time() + 300, abs=5)
    s = t.stats()
    assert (s.size, s.leased, s.inserts, s.samples) == (5, 3, 5, 3)
    assert t.ack(b.lease_id) == 3
    assert t.ack(b.lease_id) == 0  # second ack is a no-op
    s = t.stats()
    assert (s.size, s.leased, s.acks) == (2, 0, 3)


def test_reinsert_same_id_is_idempotent(r: redis.Redis) -> None:
    t = make(r)
    t.insert([traj(1), traj(2)])
    t.insert([traj(1)])
    assert t.size() == 2 and t.stats().inserts == 2


def test_max_size_fifo_remover_evicts_oldest(r: redis.Redis) -> None:
    t = make(r, max_size=3)
    t.insert([traj(i) for i in range(5)])
    s = t.stats()
    assert (s.size, s.removed) == (3, 2)
    b = t.sample(3, 0)
    assert [it.info.item_id for it in b.items] == ["t00002", "t00003", "t00004"]


def test_leased_item_not_resampled_and_max_times_sampled(r: redis.Redis) -> None:
    t = make(r, max_times_sampled=2)
    t.insert([traj(0)])
    b1 = t.sample(1, 0)
    with pytest.raises(RateLimitTimeout, match="fewer than batch_size=1 available"):
        t.sample(1, 0, timeout_s=0.1)  # leased: not sampleable
    t.ack(b1.lease_id)
    b2 = t.sample(1, 0)
    assert b2.items[0].info.times_sampled == 2
    t.ack(b2.lease_id)
    assert t.size() == 0 and t.stats().extra["consumed"] == 1


def test_unlimited_times_sampled(r: redis.Redis) -> None:
    t = make(r, max_times_sampled=0)
    t.insert([traj(0)])
    for k in range(1, 6):
        b = t.sample(1, 0)
        assert b.items[0].info.times_sampled == k
        t.ack(b.lease_id)
    assert t.size() == 1


def test_partial_ack_keeps_the_rest_leased(r: redis.Redis) -> None:
    t = make(r)
    t.insert([traj(i) for i in range(4)])
    b = t.sample(4, 0)
    assert t.ack(b.lease_id, ["t00000", "t00001", "nope"]) == 2
    assert t.stats().leased == 2
    assert t.ack(b.lease_id) == 2
    assert t.size() == 0


def test_leases_recorded_as_json_by_an_earlier_version_are_acked_viewed_and_expire(r: redis.Redis) -> None:
    t = make(r)  # max_times_sampled 1: an ack removes the item, so no ack counts are stored
    t.insert([traj(i) for i in range(4)])
    a, b = t.sample(2, 0), t.sample(2, 0, lease_s=0.3)
    assert r.hget(t.keys.leases, a.lease_id)[:1] != b"["  # written as msgpack now
    for lease in (a, b):  # rewrite both records the way versions before msgpack stored them
        ids = [it.info.item_id for it in lease.items]
        r.hset(t.keys.leases, mapping={lease.lease_id: json.dumps(ids), f"{lease.lease_id}\x1fp": "[1, 1]"})
    assert {v["lease_id"]: v["held"] for v in t.leases()} == {a.lease_id: 2, b.lease_id: 2}
    assert t.ack(a.lease_id) == 2
    time.sleep(0.4)
    again = t.sample(2, 0)  # b expired: its items are back
    assert sorted(it.info.item_id for it in again.items) == sorted(it.info.item_id for it in b.items)
    assert t.ack(again.lease_id) == 2
    assert t.size() == 0 and r.hlen(t.keys.acked) == 0 and r.hlen(t.keys.lease_of) == 0


def test_lease_expiry_returns_items(r: redis.Redis) -> None:
    t = make(r)
    t.insert([traj(i) for i in range(3)])
    b = t.sample(3, 0, lease_s=0.3)
    with pytest.raises(RateLimitTimeout):
        t.sample(1, 0, timeout_s=0.05)
    time.sleep(0.4)
    b2 = t.sample(3, 0)
    assert sorted(it.info.item_id for it in b2.items) == sorted(it.info.item_id for it in b.items)
    assert all(it.info.times_sampled == 2 for it in b2.items)
    assert t.ack(b.lease_id) == 0  # the expired lease acks nothing
    assert t.ack(b2.lease_id) == 3
    assert t.stats().extra["expired_lease_items"] == 3


def test_renew_extends_live_leases_only(r: redis.Redis) -> None:
    t = make(r)
    t.insert([traj(i) for i in range(4)])
    held = t.sample(2, 0, lease_s=0.3)
    lapsed = t.sample(2, 0, lease_s=0.3)
    time.sleep(0.15)
    assert t.renew([held.lease_id], lease_s=5.0) == 1
    time.sleep(0.3)  # `lapsed` expired, `held` did not
    assert t.renew([held.lease_id, lapsed.lease_id, "never-issued"], lease_s=5.0) == 1
    assert t.stats().leased == 2
    back = t.sample(2, 0, timeout_s=0.5)
    assert {it.info.item_id for it in back.items} == {it.info.item_id for it in lapsed.items}
    assert t.ack(held.lease_id) == 2
    assert t.renew([held.lease_id]) == 0  # acked leases are gone
    assert t.renew([]) == 0


def test_staleness_drops_old_versions(r: redis.Redis) -> None:
    t = make(r, max_staleness_versions=2)
    t.insert([traj(i, version=i) for i in range(6)])  # versions 0..5
    b = t.sample(2, learner_version=5)  # 5 - v > 2 drops v = 0, 1, 2
    assert [it.trajectory.policy_version for it in b.items] == [3, 4]
    assert max(it.info.age_versions for it in b.items) <= 2
    s = t.stats()
    assert (s.dropped_stale, s.size) == (3, 3)


def test_lifo_sampler_replays_the_newest_first(r: redis.Redis) -> None:
    """lifo hands out the newest available items; with reuse an acked item is replayed before anything older."""
    t = make(r, sampler=LifoSampler(), max_times_sampled=2)
    t.insert([traj(i) for i in range(6)])
    b = t.sample(2, 0)
    assert [it.info.item_id for it in b.items] == ["t00005", "t00004"]
    assert all(it.info.probability == 1 for it in b.items)
    t.ack(b.lease_id)
    t.insert([traj(6)])
    b = t.sample(3, 0)  # the new item, then the two just replayed (still newer than t00000-t00003)
    assert [it.info.item_id for it in b.items] == ["t00006", "t00005", "t00004"]
    assert [it.info.times_sampled for it in b.items] == [1, 2, 2]
    t.ack(b.lease_id)
    s = t.stats()
    assert (s.size, s.consumed) == (5, 2)  # t00004/t00005 used twice: gone; the old four never sampled yet
    assert [it.info.item_id for it in t.sample(5, 0).items] == ["t00006", "t00003", "t00002", "t00001", "t00000"]


def test_uniform_sampler_is_uniform(r: redis.Redis) -> None:
    t = make(r, sampler=UniformSampler(), max_times_sampled=0)
    t.insert([traj(i) for i in range(4)])
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(400):
        b = t.sample(1, 0)
        assert b.items[0].info.probability == pytest.approx(0.25)
        counts[b.items[0].info.item_id] += 1
        t.ack(b.lease_id)
    assert len(counts) == 4 and min(counts.values()) > 60  # expected 100 each


def test_prioritized_sampler_follows_priorities(r: redis.Redis) -> None:
    t = make(r, sampler=PrioritizedSampler(exponent=1.0), max_times_sampled=0)
    t.insert([traj(i) for i in range(3)], priorities=[1.0, 1.0, 1.0])
    t.update_priorities({"t00000": 8.0, "t00001": 1.0, "t00002": 1.0, "gone": 3.0})
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(500):
        b = t.sample(1, 0)
        it = b.items[0].info
        expected = {"t00000": 0.8, "t00001": 0.1, "t00002": 0.1}[it.item_id]
        assert it.probability == pytest.approx(expected)
        counts[it.item_id] += 1
        t.ack(b.lease_id)
    assert 330 < counts["t00000"] < 470  # expected 400
    # exponent 0.5: P ∝ sqrt(p)
    t2 = ReplayTable(r, TableConfig(name="p2", sampler=PrioritizedSampler(exponent=0.5), max_times_sampled=0))
    t2.insert([traj(10), traj(11)], priorities=[9.0, 1.0])
    b = t2.sample(2, 0)
    assert b.items[0].info.probability in (pytest.approx(0.75), pytest.approx(0.25))


def test_prioritized_eviction_and_slot_reuse(r: redis.Redis) -> None:
    t = make(r, max_size=4, sampler=PrioritizedSampler(exponent=1.0), max_times_sampled=0)
    for k in range(10):
        t.insert([traj(k)], priorities=[float(k + 1)])
    b = t.sample(4, 0)
    assert sorted(it.info.item_id for it in b.items) == [f"t{k:05d}" for k in range(6, 10)]
    assert sum(1 for _ in b.items) == 4 and t.stats().removed == 6


def test_cache_reference_travels_with_later_samples(r: redis.Redis) -> None:
    t = make(r, max_times_sampled=2)
    t.insert([traj(0)])
    b = t.sample(1, 0)
    assert b.items[0].trajectory.ref_logprobs is None
    t.cache_reference("t00000", [-1.0, -2.0, -3.0, -4.0], 0.75)
    t.ack(b.lease_id)
    b = t.sample(1, 0)
    assert b.items[0].trajectory.ref_logprobs == [-1.0, -2.0, -3.0, -4.0]
    assert b.items[0].trajectory.ref_v0 == 0.75
    t.cache_reference("missing", [0.0], None)  # consumed items are ignored, no error


def test_min_size_to_sample_blocks(r: redis.Redis) -> None:
    t = make(r, rate_limiter=RateLimiterConfig(min_size_to_sample=5))
    t.insert([traj(i) for i in range(4)])
    with pytest.raises(RateLimitTimeout, match="min_size_to_sample=5"):
        t.sample(1, 0, timeout_s=0.1)
    t.insert([traj(4)])
    assert len(t.sample(1, 0).items) == 1


def test_samples_per_insert_blocks_sampler_and_inserter(r: redis.Redis) -> None:
    # spi = 1, min_size 2, error_buffer 3: min_diff = -1, max_diff = 5
    t = make(r, max_times_sampled=0, rate_limiter=RateLimiterConfig(min_size_to_sample=2, samples_per_insert=1.0,
                                                                  error_buffer=3.0))
    t.insert([traj(i) for i in range(5)])  # I = 5, diff = 5 = max_diff
    with pytest.raises(RateLimitTimeout, match=r"0 of 1|1 of 1 items not admitted"):
        t.insert([traj(5)], timeout_s=0.1)  # diff + 1 = 6 > 5: actors are ahead, block them
    st = t.stats().extra["rate_limiter"]
    assert st["can_insert"] is False and st["diff"] == 5
    got = 0
    while True:  # the learner may take diff - k >= -1 -> 6 samples
        try:
            b = t.sample(1, 0, timeout_s=0.05)
        except RateLimitTimeout as e:
            assert "rate limiter" in str(e)
            break
        t.ack(b.lease_id)
        got += 1
    assert got == 6
    # a blocked inserter is released as soon as the sampler moves on
    t.insert([traj(5)], timeout_s=1.0)


def test_blocked_inserter_wakes_when_sampler_consumes(r: redis.Redis) -> None:
    t = make(r, rate_limiter=RateLimiterConfig(samples_per_insert=1.0, error_buffer=2.0))
    t.insert([traj(i) for i in range(3)])  # I=3: diff 3 = max_diff (1 + 2)
    done = threading.Event()

    def insert_more() -> None:
        t.insert([traj(3)], timeout_s=5.0)
        done.set()

    th = threading.Thread(target=insert_more)
    th.start()
    time.sleep(0.2)
    assert not done.is_set()
    b = t.sample(1, 0)
    t.ack(b.lease_id)
    th.join(5)
    assert done.is_set()


def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _free_room(t: ReplayTable, k: int) -> None:
    """Sample and ack k items one at a time (each makes room for one more insert)."""
    for _ in range(k):
        t.ack(t.sample(1, 0, timeout_s=5).lease_id)


def test_blocked_inserters_get_the_freed_room_in_the_order_they_were_refused(r: redis.Redis) -> None:
    t = make(r, rate_limiter=RateLimiterConfig(samples_per_insert=1.0, error_buffer=2.0))
    t.insert([traj(i) for i in range(3)])  # diff 3 = max_diff: every further insert waits for samples
    done: dict[str, list[str]] = {}

    def insert(name: str, ids: range) -> None:  # each call from its own client, as two actors
        done[name] = ReplayTable(r).insert([traj(i) for i in ids], timeout_s=10)

    first = threading.Thread(target=insert, args=("first", range(10, 14)))
    first.start()
    _until(lambda: r.zcard(t.keys.waiters) == 1)
    second = threading.Thread(target=insert, args=("second", range(20, 24)))
    second.start()
    _until(lambda: r.zcard(t.keys.waiters) == 2)
    assert t.stats().extra["rate_limiter"]["waiting_inserts"] == 2
    _free_room(t, 4)  # room for 4: all of it goes to the call refused first, though the second polls more often
    first.join(5)
    assert done["first"] == [f"t{i:05d}" for i in range(10, 14)]
    time.sleep(0.1)
    assert second.is_alive() and not [x for x in r.zrange(t.keys.order, 0, -1) if x.startswith(b"t0002")]
    _free_room(t, 4)
    second.join(5)
    assert done["second"] == [f"t{i:05d}" for i in range(20, 24)]
    assert r.zcard(t.keys.waiters) == 0  # both left the line


def test_an_inserter_that_gives_up_or_stops_polling_leaves_the_line(r: redis.Redis) -> None:
    t = make(r, rate_limiter=RateLimiterConfig(samples_per_insert=1.0, error_buffer=2.0))
    t.insert([traj(i) for i in range(3)])
    with pytest.raises(RateLimitTimeout):  # refused, then given up: out of the line at once
        ReplayTable(r).insert([traj(i) for i in range(10, 14)], timeout_s=0.1)
    assert r.zcard(t.keys.waiters) == 0
    assert t._run("update", ["probe", 4, "crashed", 4]) == [b"rate", 0]  # refused, then never seen again
    assert r.zcard(t.keys.waiters) == 1
    _free_room(t, 2)
    t0 = time.monotonic()
    t.insert([traj(20), traj(21)], timeout_s=5)  # held back until the crashed call's place expires (1 s)
    assert 0.7 < time.monotonic() - t0 < 3
    assert r.zcard(t.keys.waiters) == 0


def test_a_long_line_gives_the_room_to_its_head_only(r: redis.Redis) -> None:
    t = make(r, rate_limiter=RateLimiterConfig(samples_per_insert=1.0, error_buffer=2.0))
    t.insert([traj(i) for i in range(3)])  # no room
    calls = [f"c{i:02d}" for i in range(40)]  # more than one read of the line (16 at a time)
    for c in calls:  # each refused in turn, wanting one item
        assert t._run("update", ["probe", 1, c, 1]) == [b"rate", 0]
    assert t.stats().extra["rate_limiter"]["waiting_inserts"] == 40

    def allowed(call: str) -> int:
        return int(t._run("update", ["probe", 1, call, 1])[1])

    _free_room(t, 3)  # room for 3: the first three calls in line, nobody else
    assert [allowed(c) for c in calls] == [1, 1, 1] + [0] * 37
    assert allowed("newcomer") == 0
    assert r.zrange(t.keys.waiters, 0, -1) == [c.encode() for c in calls] + [b"newcomer"]  # in order; it joined last


def test_dropped_items_credit_the_limiter(r: redis.Redis) -> None:
    # Staleness drops count as the samples those items will never get: inserts never deadlock.
    t = make(r, max_staleness_versions=0, rate_limiter=RateLimiterConfig(samples_per_insert=1.0, error_buffer=2.0))
    t.insert([traj(i, version=0) for i in range(3)])
    with pytest.raises(RateLimitTimeout):
        t.sample(1, learner_version=1, timeout_s=0.05)  # all three dropped as stale
    assert t.stats().dropped_stale == 3
    t.insert([traj(i, version=1) for i in range(3, 6)], timeout_s=1.0)


def test_pause_and_resume(r: redis.Redis) -> None:
    t = make(r)
    t.insert([traj(0)])
    t.pause("sampling")
    with pytest.raises(RateLimitTimeout, match="paused"):
        t.sample(1, 0, timeout_s=0.05)
    t.resume("sampling")
    t.pause("inserts")
    with pytest.raises(RateLimitTimeout, match="paused"):
        t.insert([traj(1)], timeout_s=0.05)
    t.resume("inserts")
    t.insert([traj(1)], timeout_s=0.05)
    assert t.stats().extra["paused"] == []


def test_config_stored_and_mismatch_is_an_error(r: redis.Redis) -> None:
    make(r, max_size=50)
    assert ReplayTable(r).config.max_size == 50  # adopts the stored config
    with pytest.raises(TableConfigMismatch, match="max_size"):
        make(r, max_size=60)
    ReplayTable(r).drop()
    assert make(r, max_size=60).config.max_size == 60


def test_reset_clears_contents_and_counters(r: redis.Redis) -> None:
    t = make(r)
    t.insert([traj(i) for i in range(3)])
    t.reset()
    s = t.stats()
    assert (s.size, s.inserts) == (0, 0)
    assert ReplayTable(r).config == t.config


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda t: t.sample(0, 0), "batch_size=0"),
        (lambda t: t.sample(2, -1), "learner_version=-1"),
        (lambda t: t.sample(1, 0, timeout_s=-1), "timeout_s=-1"),
        (lambda t: t.sample(1, 0, lease_s=0), "lease_s=0"),
        (lambda t: t.sample(10**9, 0), "batch_size=1000000000"),
        (lambda t: t.insert([traj(0)], timeout_s=-2), "timeout_s=-2"),
        (lambda t: t.insert([traj(0)], priorities=[-1.0]), "priority -1.0"),
        (lambda t: t.update_priorities({"x": float("nan")}), "priority nan"),
        (lambda t: t.ack(""), "lease_id=''"),
        (lambda t: t.renew(["x"], lease_s=-1), "lease_s=-1"),
        (lambda t: t.renew([""]), "lease ids must be non-empty"),
        (lambda t: t.pause("everything"), "what='everything'"),
    ],
)
def test_bad_parameters_name_the_value(r: redis.Redis, call, pattern: str) -> None:
    with pytest.raises(ValueError, match=re.escape(pattern)):
        call(make(r))


def test_bad_configs_name_the_value(r: redis.Redis) -> None:
    with pytest.raises(ValueError, match="error_buffer=0.5"):
        make(r, rate_limiter=RateLimiterConfig(samples_per_insert=2.0, error_buffer=0.5))
    with pytest.raises(ValueError, match="min_size_to_sample=10"):
        make(r, max_size=5, rate_limiter=RateLimiterConfig(min_size_to_sample=10))
    t = make(r, rate_limiter=RateLimiterConfig(samples_per_insert=1.0, error_buffer=4.0))
    with pytest.raises(ValueError, match="batch_size=16"):
        t.sample(16, 0)
    with pytest.raises(ValueError, match="'bad name'"):
        ReplayTable(r, name="bad name")


def test_histograms_and_listing(r: redis.Redis) -> None:
    t = make(r, sampler=FifoSampler())
    t.insert([traj(i, version=i % 3, reward=float(i % 2), actor=f"a{i % 2}") for i in range(12)])
    b = t.sample(2, 0)
    t.ack(b.lease_id)
    h = t.histograms(learner_version=4)
    assert sum(h["policy_version"].values()) == 10
    assert h["version_lag"] == {"2": 4, "3": 3, "4": 3}  # t00000 (v0), t00001 (v1) consumed
    assert h["times_sampled"] == {"0": 10}
    total, rows = t.list_items(min_version=1, max_version=1, actor_id="a1", limit=2)
    assert total == 1 and [x[0] for x in rows] == ["t00007"]
    assert all(x[1].policy_version == 1 and x[1].actor_id == "a1" for x in rows)
    total, rows = t.list_items(min_version=1, max_version=2, limit=3, offset=1)
    assert total == 7 and [x[0] for x in rows] == ["t00004", "t00005", "t00007"]
    total, rows = t.list_items(min_reward=0.5)
    assert total == 5 and all(x[1].reward == 1.0 for x in rows)


@pytest.mark.parametrize("sampler", [UniformSampler(), PrioritizedSampler(), FifoSampler(), LifoSampler()])
def test_available_items_are_a_set_unless_the_sampler_needs_their_order(r: redis.Redis, sampler) -> None:
    t = make(r, sampler=sampler, max_times_sampled=0)
    t.insert([traj(i) for i in range(6)])
    b = t.sample(4, 0)
    ordered = sampler.kind in ("fifo", "lifo")
    pool, other = (t.keys.avail, t.keys.avail_set) if ordered else (t.keys.avail_set, t.keys.avail)
    assert r.type(pool) == (b"zset" if ordered else b"set") and not r.exists(other)
    leased = {it.info.item_id for it in b.items}
    assert {x.decode() for x in (r.zrange(pool, 0, -1) if ordered else r.smembers(pool))} == {
        f"t{i:05d}" for i in range(6)} - leased
    assert t.ack(b.lease_id) == 4 and t.stats().extra["available"] == 6
    seen = collections.Counter()
    for _ in range(30):
        got = t.sample(3, 0)
        seen.update(it.info.item_id for it in got.items)
        t.ack(got.lease_id)
    assert len(seen) == 6 if not ordered else len(seen) >= 3


def test_a_zset_pool_of_an_earlier_version_is_used_until_it_empties(r: redis.Redis) -> None:
    t = make(r, sampler=UniformSampler(), max_times_sampled=0, max_staleness_versions=6)
    t.insert([traj(i, version=i) for i in range(4)])
    # rewrite the pool the way versions before the set kept it: a zset scored by insertion sequence
    ids = [x.decode() for x in r.smembers(t.keys.avail_set)]
    r.zadd(t.keys.avail, dict(zip(ids, r.zmscore(t.keys.order, ids), strict=True)))
    r.delete(t.keys.avail_set)
    t.insert([traj(4, version=4)])
    b = t.sample(3, learner_version=8)  # t00000, t00001 are stale (8 - version > 6) and dropped from the zset
    assert t.stats().dropped_stale == 2 and r.zcard(t.keys.avail) == 0 and not r.exists(t.keys.avail_set)
    assert sorted(it.info.item_id for it in b.items) == ["t00002", "t00003", "t00004"]
    assert t.ack(b.lease_id) == 3  # the zset emptied: the acked items go to the set
    assert r.scard(t.keys.avail_set) == 3 and not r.exists(t.keys.avail)
    t.insert([traj(5, version=8)])
    assert t.stats().extra["available"] == 4 and r.scard(t.keys.avail_set) == 4


def test_a_removed_item_leaves_both_pools(r: redis.Redis) -> None:
    t = make(r, sampler=UniformSampler(), max_size=4)
    t.insert([traj(i) for i in range(4)])
    r.zadd(t.keys.avail, {"t00003": 3})  # a client of an earlier version put t00003 back into the zset pool
    r.srem(t.keys.avail_set, "t00003")
    t.insert([traj(4)])  # evicts the oldest, t00000, which sits in the set while the scripts use the zset
    assert not r.sismember(t.keys.avail_set, "t00000") and t.stats().removed == 1
    assert {x.decode() for x in r.zrange(t.keys.avail, 0, -1)} == {"t00003", "t00004"}


def test_meta_entries_of_an_earlier_version_are_sampled_and_listed(r: redis.Redis) -> None:
    t = make(r, sampler=FifoSampler())
    t.insert([traj(i, version=i, reward=float(i % 2), actor=f"a|{i % 2}") for i in range(4)])
    head = r.hget(t.keys.meta, "t00000")
    assert head[:1] == b"\0" and split_meta(head)[1:] == (0.0, 0.0, "a|0")  # written with the binary head now
    for i in (1, 3):  # rewrite two entries the way versions before the binary head stored them
        r.hset(t.keys.meta, f"t{i:05d}", f"{1_000_000 + i}.25|{float(i % 2)!r}|a|{i % 2}")
    b = t.sample_columns(4, learner_version=10)
    assert b.ids == [f"t{i:05d}" for i in range(4)]
    assert b.age_versions.tolist() == [10, 9, 8, 7]  # the old entries' versions come from byver
    assert b.inserted_at[[1, 3]].tolist() == [1_000_001.25, 1_000_003.25]
    assert b.inserted_at[[0, 2]] == pytest.approx(time.time(), abs=5)
    assert b.times_sampled.tolist() == [1] * 4 and b.probability.tolist() == [1.0] * 4
    h = t.histograms(learner_version=10)
    assert h["reward_by_version"] == {"0": 0.0, "1": 1.0, "2": 0.0, "3": 1.0}
    total, rows = t.list_items(actor_id="a|1", min_reward=0.5)
    assert total == 2 and [x[0] for x in rows] == ["t00001", "t00003"]


def test_aof_restart_keeps_contents_and_counters(aof_redis) -> None:
    r = connect(aof_redis.url)
    t = ReplayTable(r, TableConfig(max_times_sampled=1))
    t.insert([traj(i) for i in range(10)])
    b = t.sample(4, 0)
    t.ack(b.lease_id)
    t.cache_reference("t00005", [0.5, 0.25, 0.125, 1.0], None)  # float32-exact values
    before = t.stats()
    aof_redis.restart()
    r2 = connect(aof_redis.url)
    t2 = ReplayTable(r2)  # the stored config comes back too
    after = t2.stats()
    assert (after.size, after.inserts, after.samples, after.acks) == (6, 10, 4, 4)
    assert after.extra["consumed"] == before.extra["consumed"] == 4
    b = t2.sample(6, 0)
    assert sorted(it.info.item_id for it in b.items) == [f"t{i:05d}" for i in range(4, 10)]
    assert next(it for it in b.items if it.info.item_id == "t00005").trajectory.ref_logprobs == [0.5, 0.25, 0.125, 1.0]
    # the old client object keeps working too (reconnect + script reload)
    assert t.ack(b.lease_id) == 6
    aof_redis.restart()
    t.insert([traj(50)])  # MULTI with EVALSHA after the script cache was lost: reloaded and redone
    assert t.size() == 1 and t.stats().inserts == 11


def test_no_orphan_payloads_when_not_admitted(r: redis.Redis) -> None:
    t = make(r, rate_limiter=RateLimiterConfig(samples_per_insert=1.0, error_buffer=2.0))
    with pytest.raises(RateLimitTimeout):
        t.insert([traj(i) for i in range(6)], timeout_s=0.05)  # only 3 fit (max_diff = 3)
    assert t.size() == 3 and r.hlen(t.keys.items) == 3
    t.pause("inserts")
    with pytest.raises(RateLimitTimeout):
        t.insert([traj(9)], timeout_s=0.05)
    assert r.hlen(t.keys.items) == 3


def test_large_batch_and_duplicates_in_one_call(r: redis.Redis) -> None:
    t = make(r, max_size=7)
    ids = t.insert([traj(i) for i in range(20)] + [traj(19), traj(18)])  # 18, 19 still stored: skipped
    assert len(ids) == 22
    assert t.size() == 7 and t.stats().inserts == 20 and r.hlen(t.keys.items) == 7
    assert sorted(it.info.item_id for it in t.sample(7, 0).items) == [f"t{i:05d}" for i in range(13, 20)]
    t2 = ReplayTable(r, TableConfig(name="dups"))
    t2.insert([traj(1), traj(2), traj(1)])
    assert t2.stats().inserts == 2


def test_an_encoded_batch_is_inserted_once_however_often_it_is_sent(r: redis.Redis) -> None:
    t = make(r, rate_limiter=RateLimiterConfig(samples_per_insert=1.0, error_buffer=2.0))
    batch = t.encode_batch([traj(i) for i in range(5)] + [traj(0)])  # encoded once; the repeat is not sent
    assert [row[0] for row in batch.rows] == [f"t{i:05d}" for i in range(5)] and batch.repeated == ["t00000"]
    with pytest.raises(RateLimitTimeout) as e:
        t.insert_encoded(batch, timeout_s=0.05)  # only 3 fit (max_diff = 3)
    got = e.value.result
    assert (got.admitted, got.duplicates, got.pending) == ([f"t{i:05d}" for i in range(3)], ["t00000"],
                                                           ["t00003", "t00004"])
    t.ack(t.sample(3, 0).lease_id)
    again = t.insert_encoded(batch, timeout_s=5)  # the same bytes sent again: only the pending ones get in
    assert again.admitted == ["t00003", "t00004"] and sorted(again.duplicates) == ["t00000", "t00000", "t00001",
                                                                                    "t00002"]
    stored = t.get("t00004")[0].model_dump(exclude={"created_at"})
    assert t.stats().inserts == 5 and stored == traj(4).model_dump(exclude={"created_at"})
    with pytest.raises(ValueError, match="timeout_s=-1"):
        t.insert_encoded(batch, timeout_s=-1)


def test_prioritized_leases_expiry_and_zero_priorities(r: redis.Redis) -> None:
    t = make(r, sampler=PrioritizedSampler(exponent=1.0), max_times_sampled=0)
    t.insert([traj(0), traj(1)], priorities=[3.0, 1.0])
    b = t.sample(1, 0, lease_s=0.2)
    other = "t00001" if b.items[0].info.item_id == "t00000" else "t00000"
    b2 = t.sample(1, 0)  # the leased item's mass is out of the tree: the other one has probability 1
    assert b2.items[0].info.item_id == other and b2.items[0].info.probability == pytest.approx(1.0)
    t.update_priorities({other: 0.0})
    t.ack(b2.lease_id)
    time.sleep(0.3)  # the first lease expires; its item's priority mass comes back
    b3 = t.sample(1, 0)
    assert b3.items[0].info.item_id == b.items[0].info.item_id and b3.items[0].info.probability == pytest.approx(1.0)
    t.ack(b3.lease_id)
    t.update_priorities({"t00000": 0.0, "t00001": 0.0})
    assert len(t.sample(2, 0).items) == 2  # all zero: falls back to uniform instead of blocking
