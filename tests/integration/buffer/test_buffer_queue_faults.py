"""Prompt queue and actor registry under faults: a loader dying mid-load, reloads of a served queue, epoch
refills by one consumer, heartbeats racing a deregister, dead actors pruned."""

from __future__ import annotations

import threading
import time

import pytest
import redis

import buffer.registry
from buffer.client import ActorInfo, ActorRegistry, PromptQueue, connect
from problems.toy import make_toy_task


def test_a_loader_that_died_leaves_no_marker(redis_url: str) -> None:
    r = connect(redis_url)
    q = PromptQueue(r)
    r.hset(q.keys.meta, "loading", "1")  # what a loader killed between its marker and EXEC used to leave
    assert not q.loaded()
    assert q.load(make_toy_task(4, seed=1), epochs=1, if_empty=True) == 4
    assert len(q.pop(4, "c")) == 4


def test_a_served_queue_is_not_reloaded_from_epoch_zero(redis_url: str) -> None:
    q = PromptQueue(connect(redis_url))
    prompts = make_toy_task(3, seed=2)
    q.load(prompts, epochs=2)
    q.pop(3, "c")
    q.pop(3, "c")  # the last epoch: every prompt claimed, none queued
    assert q.size() == 0 and q.epochs() == (1, 2)
    assert q.loaded()
    assert q.load(prompts, epochs=2, if_empty=True) == 0  # a resumed run keeps its epochs and claims
    assert q.epochs() == (1, 2) and q.claimed() == 6


def test_only_one_consumer_builds_the_next_epoch(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = connect(redis_url)
    holder, waiter = PromptQueue(r), PromptQueue(r)
    q = PromptQueue(r)
    q.load(make_toy_task(5, seed=3), epochs=2, shuffle_seed=1)
    q.pop(5, "a")  # epoch 0 served
    built = []
    monkeypatch.setattr(waiter, "_order", lambda *a: built.append(a) or PromptQueue._order(*a))
    assert holder._ops(keys=holder.keys.all(), args=["refill_claim", 0, "30"]) == 1  # another consumer's claim
    got: list = []
    th = threading.Thread(target=lambda: got.extend(waiter.pop(2, "b")))
    th.start()
    time.sleep(0.3)
    assert th.is_alive() and built == []  # waiting for the holder, not sending its own permutation
    holder._ops(keys=holder.keys.all(), args=["refill", 0] + PromptQueue._order(5, 1, 1))
    th.join(5)
    assert [p.epoch for p in got] == [1, 1] and built == []
    assert q.size() == 3


def test_a_heartbeat_racing_a_deregister_does_not_resurrect(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = connect(redis_url)
    reg = ActorRegistry(r)
    reg.register(ActorInfo(actor_id="a1", url="http://x:1"), ttl_s=30)
    real = buffer.registry._server_time

    def deregister_meanwhile(client):
        reg.deregister("a1")  # e.g. an operator, between the heartbeat's read and its write
        return real(client)

    monkeypatch.setattr(buffer.registry, "_server_time", deregister_meanwhile)
    with pytest.raises(KeyError, match="deregistered"):
        reg.heartbeat("a1", ttl_s=30, policy_version=3)
    monkeypatch.setattr(buffer.registry, "_server_time", real)
    assert reg.all() == [] and reg.live() == []


def test_dead_actors_are_pruned(redis_url: str) -> None:
    reg = ActorRegistry(connect(redis_url))
    reg.register(ActorInfo(actor_id="dead", url="http://x:1"), ttl_s=0.05)
    reg.register(ActorInfo(actor_id="alive", url="http://x:2"), ttl_s=30)
    time.sleep(0.2)
    assert [(a.actor_id, live) for a, live in reg.all()] == [("alive", True), ("dead", False)]
    assert reg.prune(older_than_s=0.1) == 1
    assert [a.actor_id for a, _ in reg.all()] == ["alive"]


def test_a_pop_retried_with_its_request_id_claims_nothing_new(redis_url: str) -> None:
    q = PromptQueue(connect(redis_url))
    q.load(make_toy_task(3, seed=4), epochs=2, shuffle_seed=1)
    first = q.pop(5, "c", request_id="r1")  # crosses the epoch boundary: two rounds
    assert len(first) == 5 and q.claimed() == 5 and q.size() == 1
    again = q.pop(5, "c", request_id="r1")
    assert [(p.prompt_id, p.epoch) for p in again] == [(p.prompt_id, p.epoch) for p in first]
    assert q.claimed() == 5 and q.size() == 1
    assert len(q.pop(5, "c", request_id="r2")) == 1  # a new request claims new prompts
    q.done("c", [first[0].prompt_id])
    assert len(q.pop(5, "c", request_id="r2")) == 1  # replays only what "c" still holds of r2
    with pytest.raises(ValueError, match="request_id"):
        q.pop(1, "c", request_id="")


def test_a_lost_pop_reply_strands_no_claim(redis_url: str) -> None:
    """The connection drops after Redis ran the pop script: the client's retry (same request id, as the actor
    sends) must get those prompts, not claim others and leave the first ones held by nobody until they expire."""
    q = PromptQueue(connect(redis_url))
    q.load(make_toy_task(8, seed=5), epochs=1)
    real, lost = q._pop, []

    def drop_first_reply(*args: object, **kwargs: object) -> object:
        res = real(*args, **kwargs)
        if not lost:
            lost.append(res)
            raise redis.exceptions.ConnectionError("connection reset by peer")
        return res

    q._pop = drop_first_reply  # type: ignore[method-assign]
    got = None
    for rid in ["a1"] * 3:  # the actor's retry loop: one request id for every retry of one pop
        try:
            got = q.pop(3, "actor-1", lease_s=600.0, request_id=rid)
            break
        except redis.exceptions.ConnectionError:
            continue
    assert got is not None and len(got) == 3
    assert q.claimed() == 3 and q.size() == 5  # nothing stranded: the 3 claims are the 3 prompts the actor has
    assert {c["prompt_id"] for c in q.claims()} == {p.prompt_id for p in got}
