"""PromptQueue.renew against a real redis-server: a consumer that still works on its prompts (an actor waiting on
back-pressure) moves their claims' expiry forward, so they are not re-served to another consumer; a claim that
already expired and was re-served is not taken back."""

from __future__ import annotations

import time

from buffer.client import PromptQueue, connect
from problems.toy import make_toy_task


def test_renewed_claims_outlive_their_first_lease_and_expired_ones_stay_reserved(redis_url) -> None:
    queue = PromptQueue(connect(redis_url), "renew")
    queue.load(make_toy_task(6, seed=3), epochs=1)
    held = queue.pop(2, "actor-a", lease_s=1.0)
    ids = [p.prompt_id for p in held]
    for _ in range(4):  # 2 s in all: twice the first lease
        time.sleep(0.5)
        assert queue.renew("actor-a", ids, lease_s=1.0) == 2
    got = {p.prompt_id for p in queue.pop(10, "actor-b", lease_s=60.0)}
    assert got.isdisjoint(ids) and len(got) == 4
    assert queue.info()["reclaimed"] == 0
    assert queue.renew("actor-b", ids, lease_s=1.0) == 0  # not its claims
    assert queue.renew("actor-a", [], lease_s=1.0) == 0

    # without renewal the claims expire and the next pop re-serves them; a late renew does not take them back
    time.sleep(1.2)
    again = {p.prompt_id for p in queue.pop(10, "actor-b", lease_s=60.0)}
    assert again == set(ids) and queue.info()["reclaimed"] == 2
    assert queue.renew("actor-a", ids, lease_s=60.0) == 0
