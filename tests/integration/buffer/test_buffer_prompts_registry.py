"""Prompt queue (epochs, atomic pops across processes, claim expiry), actor registry, weights and learner status."""

from __future__ import annotations

import collections
import multiprocessing as mp
import time

import pytest

from buffer.client import (
    ActorInfo,
    ActorRegistry,
    LearnerStatus,
    LearnerStatusStore,
    PromptQueue,
    WeightsInfo,
    WeightsStore,
    connect,
)
from problems.toy import make_toy_task


def test_epochs_are_shuffled_and_complete(redis_url: str) -> None:
    q = PromptQueue(connect(redis_url))
    prompts = make_toy_task(20, seed=3)
    assert q.load(prompts, epochs=3, shuffle_seed=7) == 60
    assert q.size() == 60 and q.epochs() == (0, 3)
    got = []
    while batch := q.pop(7, "c"):
        got += batch
        q.done("c", [p.prompt_id for p in batch])
    assert len(got) == 60 and q.size() == 0 and q.epochs() == (2, 3)
    by_epoch = collections.defaultdict(list)
    for p in got:
        by_epoch[p.epoch].append(p.prompt_id)
    ids = sorted(p.prompt_id for p in prompts)
    assert all(sorted(v) == ids for v in by_epoch.values()) and sorted(by_epoch) == [0, 1, 2]
    assert by_epoch[0] != by_epoch[1]  # reshuffled per epoch
    assert q.info()["claimed"] == 0 and q.info()["done"] == 60
    # the same seed gives the same order on another load
    q.load(prompts, epochs=1, shuffle_seed=7)
    assert [p.prompt_id for p in q.pop(20, "c")] == by_epoch[0]


def test_claims_expire_and_give_back(redis_url: str) -> None:
    q = PromptQueue(connect(redis_url))
    q.load(make_toy_task(5), epochs=1, shuffle_seed=None)
    a = q.pop(2, "dead", lease_s=0.2)
    b = q.pop(1, "alive")
    assert q.size() == 2 and q.info()["claimed"] == 3
    q.give_back("alive", b)
    assert q.size() == 3
    time.sleep(0.3)
    rest = q.pop(10, "other")
    assert sorted(p.prompt_id for p in rest) == sorted(p.prompt_id for p in make_toy_task(5))
    assert {p.prompt_id for p in a} <= {p.prompt_id for p in rest}
    assert q.info()["reclaimed"] == 2


def test_load_if_empty_keeps_an_existing_queue(redis_url: str) -> None:
    q = PromptQueue(connect(redis_url))
    q.load(make_toy_task(4), epochs=2)
    q.pop(3, "c")
    assert q.load(make_toy_task(9), if_empty=True) == 0
    assert q.size() == 5


def test_bad_queue_parameters(redis_url: str) -> None:
    q = PromptQueue(connect(redis_url))
    with pytest.raises(ValueError, match="epochs=0"):
        q.load(make_toy_task(2), epochs=0)
    with pytest.raises(ValueError, match="duplicate prompt_id"):
        q.load(make_toy_task(2) * 2)
    with pytest.raises(ValueError, match="n=0"):
        q.pop(0, "c")
    with pytest.raises(ValueError, match="'bad/name'"):
        PromptQueue(connect(redis_url), "bad/name")


def _popper(url: str, k: int, out: mp.Queue) -> None:
    q = PromptQueue(connect(url))
    got = []
    while batch := q.pop(3, f"c{k}"):
        got += [(p.prompt_id, p.epoch) for p in batch]
        q.done(f"c{k}", [p.prompt_id for p in batch])
    out.put(got)


def test_concurrent_pops_never_duplicate(redis_url: str) -> None:
    q = PromptQueue(connect(redis_url))
    q.load(make_toy_task(50), epochs=4, shuffle_seed=1)
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_popper, args=(redis_url, k, out)) for k in range(4)]
    for p in procs:
        p.start()
    got = [x for _ in procs for x in out.get(timeout=60)]
    for p in procs:
        p.join(10)
    assert len(got) == 200 and len(set(got)) == 200


def test_registry_liveness(redis_url: str) -> None:
    reg = ActorRegistry(connect(redis_url))
    reg.register(ActorInfo(actor_id="a0", url="http://h:8100"), ttl_s=0.3)
    reg.register(ActorInfo(actor_id="a1", url="http://h:8101"), ttl_s=30)
    assert {a.actor_id for a in reg.live()} == {"a0", "a1"}
    reg.heartbeat("a1", policy_version=4, tokens_per_s=12.5)
    time.sleep(0.4)
    live = reg.live()
    assert [a.actor_id for a in live] == ["a1"] and live[0].policy_version == 4 and live[0].tokens_per_s == 12.5
    reg.heartbeat("a0", ttl_s=5)  # a late heartbeat revives a known actor
    assert {a.actor_id for a in reg.live()} == {"a0", "a1"}
    with pytest.raises(ValueError, match="nonsense"):
        reg.heartbeat("a0", nonsense=1)
    reg.deregister("a0")
    with pytest.raises(KeyError, match="a0"):
        reg.heartbeat("a0")
    assert [a.actor_id for a, live in reg.all()] == ["a1"]


def test_weights_only_move_forward_and_learner_status(redis_url: str) -> None:
    r = connect(redis_url)
    w = WeightsStore(r)
    assert w.latest() is None
    w.set_latest(WeightsInfo(version=3, sha256="c" * 64, nbytes=10))
    w.set_latest(WeightsInfo(version=2, sha256="b" * 64, nbytes=10))
    assert w.latest().version == 3
    s = LearnerStatusStore(r)
    assert s.get() is None
    s.set(LearnerStatus(step=5, policy_version=3, metrics={"loss": 1.5}))
    assert s.get().metrics == {"loss": 1.5}
