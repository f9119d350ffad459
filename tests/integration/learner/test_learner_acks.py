"""PendingAcks (learner/acks.py) over a real Redis: held leases outlive lease_s until acked, and expire once
renewal stops (what a crashed learner leaves behind)."""

from __future__ import annotations

import time

from buffer.client import ReplayTable, Trajectory, connect
from buffer.schema import FifoSampler, TableConfig
from learner.acks import PendingAcks

LEASE_S = 0.4


def table_with(redis_url: str, n: int) -> ReplayTable:
    t = ReplayTable(connect(redis_url), TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    t.insert([
        Trajectory(traj_id=f"t{i}", prompt_id=f"p{i}", group_id=f"g{i}", prompt_token_ids=[1, 2],
                   response_token_ids=[3], behaviour_logprobs=[-1.0], reward=0.0, grade_status="incorrect",
                   policy_version=0)
        for i in range(n)
    ])
    return t


def test_held_leases_survive_until_ack_all(redis_url: str) -> None:
    t = table_with(redis_url, 4)
    pending = PendingAcks(t, LEASE_S, renew_every_s=0.1)
    try:
        for _ in range(2):
            b = t.sample(2, 0, lease_s=LEASE_S)
            pending.add([b.lease_id], len(b.items))
        assert pending.pending_items == 4
        time.sleep(3 * LEASE_S)  # three lease terms: only the renewals keep them
        assert t.stats().leased == 4 and pending.expired == 0
        assert pending.ack_all() == (4, 4)
        assert pending.pending_items == 0
        st = t.stats()
        assert st.acks == 4 and st.size == 0 and st.extra["expired_lease_items"] == 0
    finally:
        pending.close()


def test_after_close_leases_expire_and_items_return(redis_url: str) -> None:
    t = table_with(redis_url, 3)
    pending = PendingAcks(t, LEASE_S, renew_every_s=0.1)
    b = t.sample(3, 0, lease_s=LEASE_S)
    pending.add([b.lease_id], 3)
    pending.close()  # a crash: nobody renews any more
    time.sleep(LEASE_S + 0.2)
    again = t.sample(3, 0, timeout_s=1.0)
    assert {it.info.item_id for it in again.items} == {it.info.item_id for it in b.items}
    assert all(it.info.times_sampled == 2 for it in again.items)
    assert t.stats().acks == 0


def test_an_expired_lease_is_counted_not_revived(redis_url: str) -> None:
    t = table_with(redis_url, 2)
    pending = PendingAcks(t, LEASE_S, renew_every_s=60.0)  # the thread never gets to renew
    try:
        b = t.sample(2, 0, lease_s=0.1)
        time.sleep(0.3)
        pending.add([b.lease_id], 2)  # add renews at once, too late for this lease
        assert pending.expired == 1
        assert pending.ack_all() == (0, 2)
        assert t.stats().leased == 0 and t.stats().size == 2
    finally:
        pending.close()
