"""The learner's ack path under Redis trouble (issue 21), real redis-server processes:

- an ack that meets a Redis restart is retried (bounded, logged) instead of crashing the learner;
- sync mode renews the leases of the items it keeps while it waits for more current-version trajectories, so none
  expires, comes back and lands twice in the same batch.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from harness import RedisProcess

from buffer.client import ReplayTable, Trajectory, connect
from buffer.schema import FifoSampler, TableConfig
from learner.acks import PendingAcks


def _traj(i: int, version: int = 0) -> Trajectory:
    return Trajectory(traj_id=f"t{i}", prompt_id=f"p{i}", group_id=f"g{i}", prompt_token_ids=[1, 2],
                      response_token_ids=[3], behaviour_logprobs=[-1.0], reward=0.0, grade_status="incorrect",
                      policy_version=version)


def _table(url: str) -> ReplayTable:
    return ReplayTable(connect(url), TableConfig(sampler=FifoSampler(), max_times_sampled=1))


def test_acks_ride_out_a_redis_restart(aof_redis: RedisProcess) -> None:
    t = _table(aof_redis.url)
    t.insert([_traj(i) for i in range(4)])
    pending = PendingAcks(t, 60.0, renew_every_s=60.0)
    try:
        b = t.sample(4, 0)
        pending.add([b.lease_id], 4)
        aof_redis.stop()  # Redis goes away right before the checkpoint's acks
        threading.Timer(1.5, aof_redis.start).start()  # and comes back from its AOF
        t0 = time.monotonic()
        assert pending.ack_all() == (4, 4)
        assert time.monotonic() - t0 >= 1.0  # it waited for Redis rather than failing
    finally:
        pending.close()
    st = t.stats()
    assert st.acks == 4 and st.size == 0 and st.leased == 0


def test_sync_mode_renews_the_leases_it_holds_while_waiting(redis_url: str, tmp_path: Path) -> None:
    from learner.batch import sample_batch
    from learner.settings import LearnerSettings

    t = _table(redis_url)
    t.insert([_traj(0, version=0), _traj(9, version=1)])  # one for this version, one from another
    s = LearnerSettings(model_path=tmp_path, run_dir=tmp_path, redis_url=redis_url, batch_size=2, sync=True,
                        lease_s=0.6, sample_timeout_s=0.3, port=0, table=t.config)
    late = threading.Timer(2.0, lambda: t.insert([_traj(1, version=0)]))  # the 2nd current-version trajectory
    late.start()
    got = sample_batch(t, s, 0, threading.Event())
    late.join()
    assert got is not None
    items, leases = got
    ids = [it.info.item_id for it in items]
    assert sorted(ids) == ["t0", "t1"], ids  # without renewal t0's lease expires and t0 comes back twice
    assert sum(t.ack(lease) for lease in leases) == 2
    st = t.stats()
    assert st.extra["expired_lease_items"] == 0 and st.acks == 3  # t9 was acked away (another version)
