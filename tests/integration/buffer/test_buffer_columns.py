"""Columnar batches against a real redis-server: zero-copy views, sample + ack in one script, and a learner
loop at one round trip per step (BatchStream)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from buffer import resp
from buffer.client import BatchStream, ReplayTable, Trajectory, connect
from buffer.schema import FifoSampler, StorageConfig, TableConfig


def traj(k: int) -> Trajectory:
    return Trajectory(
        traj_id=f"i{k:03d}", prompt_id="p", group_id=f"g{k // 2}", prompt_token_ids=[1, 2, 70_000 + k],
        response_token_ids=[k, k + 1], behaviour_logprobs=[-0.5, -0.25], reward=float(k), grade_status="correct",
        policy_version=k % 3, response_text="r" * 600,
    )


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return connect(redis_url)


def test_column_batch_views_and_trajectories(r: redis.Redis) -> None:
    t = ReplayTable(r, TableConfig(max_times_sampled=0))
    t.insert([traj(k) for k in range(4)])
    t.cache_reference("i001", [-1.0, -2.0], 0.5)
    b = t.sample_columns(4, learner_version=5)
    assert b.ids == ["i000", "i001", "i002", "i003"] and len(b) == 4
    assert b.prompt_tokens(2).tolist() == [1, 2, 70_002] and b.prompt_tokens(2).dtype == np.uint32
    assert b.response_tokens(3).dtype == np.uint16 and not b.response_tokens(3).flags.writeable
    assert b.behaviour_logprobs(0).tolist() == [-0.5, -0.25]
    assert b.ref_logprobs(1).tolist() == [-1.0, -2.0] and b.ref_logprobs(0) is None
    assert b.age_versions.tolist() == [5, 4, 3, 5] and b.times_sampled.tolist() == [1, 1, 1, 1]
    assert b.field("reward") == [0.0, 1.0, 2.0, 3.0]
    want = traj(1).model_copy(update={"ref_logprobs": [-1.0, -2.0], "ref_v0": 0.5})
    assert b.trajectory(1).model_dump(exclude={"created_at"}) == want.model_dump(exclude={"created_at"})


def test_sample_acks_the_previous_lease_in_the_same_call(r: redis.Redis) -> None:
    t = ReplayTable(r, TableConfig(max_times_sampled=1))
    t.insert([traj(k) for k in range(4)])
    b1 = t.sample(2, 0)
    b2 = t.sample_columns(2, 0, ack=[b1.lease_id])
    assert b2.acked == 2 and set(b2.ids).isdisjoint(it.info.item_id for it in b1.items)
    s = t.stats()
    assert (s.size, s.acks, s.leased) == (2, 2, 2)


def sent_requests(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The hand-packed requests (`buffer.resp.roundtrip`) sent from now on, each as bytes."""
    sent: list[bytes] = []
    real = resp.roundtrip
    monkeypatch.setattr(resp, "roundtrip", lambda redis, request, n: sent.append(b"".join(request)) or real(
        redis, request, n))
    return sent


def test_batch_stream_one_round_trip_per_step(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    t = ReplayTable(r, TableConfig(max_times_sampled=1))
    t.insert([traj(k) for k in range(12)])
    stream = BatchStream(t, 2)
    pipelines = sent_requests(monkeypatch)  # round trips: hand-packed requests and redis-py pipelines
    real = t.redis.pipeline
    monkeypatch.setattr(t.redis, "pipeline", lambda *a, **kw: pipelines.append(b"") or real(*a, **kw))
    scripts = []
    real_run = t._run
    monkeypatch.setattr(t, "_run", lambda *a: scripts.append(a[0]) or real_run(*a))
    seen, prev = [], None
    for step in range(5):
        before = (len(pipelines), len(scripts))
        b = stream.next(learner_version=step, ack=[prev] if prev else None)
        if step > 0:  # payloads of batch k + ack of k-1 + lease of k+1: one round trip, nothing else
            assert (len(pipelines), len(scripts)) == (before[0] + 1, before[1])
        seen += b.ids
        prev = b.lease_id
    assert len(seen) == len(set(seen)) == 10
    s = t.stats()
    assert (s.acks, s.leased, s.size) == (8, 4, 4)  # batch 5 unacked, batch 6 prefetched
    # a steady step runs one script: the sample script renews batch k's lease itself (no separate renew script)
    evals = r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    b = stream.next(learner_version=5, ack=[prev])
    assert r.info("commandstats")["cmdstat_evalsha"]["calls"] - evals == 1 and len(b) == 2
    s = t.stats()
    assert (s.acks, s.leased, s.size) == (10, 2, 2)  # batch 6 unacked, nothing left to prefetch
    assert stream.prefetched() is None
    t.ack(b.lease_id)
    assert t.stats().size == 0


def test_references_cached_in_one_call_and_skipped_when_never_read_again(r: redis.Redis) -> None:
    t = ReplayTable(r, TableConfig(max_times_sampled=2))
    t.insert([traj(k) for k in range(3)])
    b = t.sample(3, 0)
    refs = {"i000": ([-1.0, -1.0], 0.5), "i001": (np.array([-2.0, -2.0], np.float32), None), "gone": ([0.0], None)}
    assert t.cache_references(refs) == 2  # one call; the unknown id is skipped
    t.ack(b.lease_id)
    b = t.sample(3, 0)  # second and last training of each item: a reference cached now would never be read
    assert b.items[0].trajectory.ref_logprobs == [-1.0, -1.0] and b.items[1].trajectory.ref_logprobs == [-2.0, -2.0]
    assert t.cache_references({"i002": ([-3.0, -3.0], None)}) == 0
    assert r.hexists(t.keys.refs, "i002") == 0


def test_storage_settings_shape_what_is_stored(r: redis.Redis) -> None:
    rng = np.random.default_rng(0)
    long = [traj(k).model_copy(update={
        "response_token_ids": rng.integers(0, 151_000, 300).tolist(),
        "behaviour_logprobs": (-rng.exponential(1.0, 300)).astype(np.float32).tolist()}) for k in range(2)]
    full = ReplayTable(r, TableConfig(name="full", max_times_sampled=0))
    lean = ReplayTable(r, TableConfig(name="lean", max_times_sampled=0, storage=StorageConfig(
        logprob_dtype="float16", store_texts=False)))
    for t in (full, lean):
        t.insert(long)
    f, s = full.sample_columns(2, 0), lean.sample_columns(2, 0)
    by_id = {x.traj_id: x for x in long}
    for b in (f, s):  # token ids are exact in every setting (compressed by default)
        assert [b.response_tokens(i).tolist() for i in range(2)] == [by_id[i].response_token_ids for i in b.ids]
    assert f.trajectory(0).response_text == "r" * 600 and s.trajectory(0).response_text == ""
    want = np.array(by_id[s.ids[0]].behaviour_logprobs)
    assert s.behaviour_logprobs(0).dtype == np.float16 and np.allclose(s.behaviour_logprobs(0), want, rtol=2**-11)
    assert f.behaviour_logprobs(0).dtype == np.float32
    # float16: 2 bytes less per log-prob; no text spans
    assert r.hstrlen(lean.keys.items, s.ids[0]) < r.hstrlen(full.keys.items, s.ids[0]) - 300 * 2 - 10


def test_batch_stream_sends_queued_writes_and_acks_with_the_step(r: redis.Redis, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    t = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=0))
    t.insert([traj(k) for k in range(8)])
    stream = BatchStream(t, 2)
    b1 = stream.next(learner_version=0)
    stream.update_priorities({b1.ids[0]: 7.0})
    stream.cache_references({b1.ids[1]: ([-1.0, -1.0], 0.5)})
    alive: list[int] = []
    stream.renew([b1.lease_id], 60.0, on_reply=alive.append)
    stream.ack([b1.lease_id], items=2)
    assert t.get(b1.ids[0])[1]["priority"] != 7.0 and not r.hexists(t.keys.refs, b1.ids[1])  # queued, not sent
    r.script_load(t._scripts["update"].script)  # as after any earlier write (a first use loads it: one more trip)
    scripts, requests = [], sent_requests(monkeypatch)
    real_run = t._run
    monkeypatch.setattr(t, "_run", lambda *a: scripts.append(a[0]) or real_run(*a))
    b2 = stream.next(learner_version=1)
    assert (len(requests), scripts) == (1, [])  # everything in the step's one round trip
    assert alive == [1] and float(t.get(b1.ids[0])[1]["priority"]) == 7.0 and r.hexists(t.keys.refs, b1.ids[1])
    assert t.stats().acks == 2
    # ages against the version of the call that returns the batch (the version it is trained at)
    assert b2.ids == ["i002", "i003"] and b2.age_versions.tolist() == [1 - 2, 1 - 0]


def test_batch_stream_fetches_references_only_while_the_table_holds_some(r: redis.Redis,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    t = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=0))
    t.insert([traj(k) for k in range(4)])
    stream = BatchStream(t, 2)
    requests = sent_requests(monkeypatch)

    def fetched(key: str) -> bool:
        return any(resp.arg("HMGET") + resp.arg(key) in req for req in requests)

    b1 = stream.next(learner_version=0)
    assert fetched(t.keys.items) and not fetched(t.keys.refs)  # no reference anywhere
    assert b1.ref_logprobs(0) is None
    stream.cache_references({b1.ids[0]: ([-1.0, -1.0], 0.5)})
    stream.ack([b1.lease_id])
    b2 = stream.next(learner_version=1)  # leased before the reference existed; the next lease sees it
    assert not fetched(t.keys.refs) and b2.ids == ["i002", "i003"]
    b3 = stream.next(learner_version=2, ack=[b2.lease_id])  # fifo: the acked i000, i001 again
    assert fetched(t.keys.refs) and b3.ids == ["i000", "i001"]
    assert b3.ref_logprobs(0).tolist() == [-1.0, -1.0] and b3.ref_logprobs(1) is None


def test_batch_stream_close_sends_the_acks_and_releases_the_prefetched_lease(r: redis.Redis) -> None:
    t = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    t.insert([traj(k) for k in range(6)])
    stream = BatchStream(t, 2)
    b = stream.next(learner_version=0)
    stream.ack([b.lease_id], items=2)
    assert stream.prefetched() is not None
    assert stream.close() == 2 and stream.prefetched() is None
    s = t.stats()
    assert (s.acks, s.leased, s.size) == (2, 0, 4)
    # the prefetched items are sampleable at once (not after lease_s), first in fifo order
    assert [it.info.item_id for it in t.sample(2, 0, timeout_s=0).items] == ["i002", "i003"]
    assert stream.close() == 0  # nothing queued: no round trip


def test_batch_stream_drops_a_prefetched_batch_whose_lease_expired(r: redis.Redis, caplog: pytest.LogCaptureFixture
                                                                   ) -> None:
    t = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    t.insert([traj(k) for k in range(8)])
    stream = BatchStream(t, 2, lease_s=0.3)
    b1 = stream.next(learner_version=0)  # i000, i001; i002, i003 prefetched
    time.sleep(0.5)  # a stall longer than the lease: both leases expire, their items go back
    stream.ack([b1.lease_id], items=2)
    b2 = stream.next(learner_version=1)
    assert "expired before its step" in caplog.text and "acked 0 of 2" in caplog.text
    # the prefetched batch was dropped (its items may be leased again); the batch returned holds a live lease
    assert b2.ids == ["i000", "i001"] and t.renew([b2.lease_id]) == 1
