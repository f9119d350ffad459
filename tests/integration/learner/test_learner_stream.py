"""Rank 0's sampling through `BatchStream` in the real learner loop (real redis-server, DeepSpeed on CPU):

- one Redis round trip per step in the steady state, counted on the wire: the learner's own redis-py client gets
  a connection class that counts every packed write (a command, or a whole pipeline) sent by the training thread;
- the acks lag the ack policy, never lead it: with deferred acks nothing is acked before the checkpoint that holds
  the step, with immediate acks a batch is acked by the next step's round trip;
- a stop with a batch prefetched acks what the policy released and gives the prefetched batch back at once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from learner_helpers import toy_trajectories

import learner.train
from buffer.client import ReplayTable, connect
from buffer.keys import TableKeys
from buffer.schema import FifoSampler, PrioritizedSampler, TableConfig
from learner.services import RankZeroServices
from learner.settings import LearnerSettings
from learner.train import train

TABLE_KEY = TableKeys("replay").items.split("{")[0].encode()  # b"tbrm:v1:table:"
BATCH = 4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Wire:
    """What the learner's training thread sent to Redis: one entry per round trip (True: it touched the table)."""

    def __init__(self) -> None:
        self.trips: list[bool] = []
        self.main = threading.main_thread()

    def connection_class(self) -> type[redis.Connection]:
        wire = self

        class Counting(redis.Connection):
            def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                if threading.current_thread() is wire.main:
                    data = b"".join(command) if isinstance(command, list) else command
                    wire.trips.append(TABLE_KEY in bytes(data))
                super().send_packed_command(command, check_health)

        return Counting


def run(tmp: Path, model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, stop: threading.Event | None = None,
        stop_after: int | None = None, **kw: Any) -> tuple[list[dict[str, Any]], ReplayTable]:
    """Train with the learner's client counted; per step: table round trips, other round trips, table acks then."""
    wire = Wire()

    def counted_connect(url: str, **ckw: Any) -> redis.Redis:
        client = connect(url, **ckw)
        client.connection_pool.connection_class = wire.connection_class()
        return client

    monkeypatch.setattr(learner.train, "connect", counted_connect)
    observer = ReplayTable(connect(redis_url))
    steps: list[dict[str, Any]] = []
    real_record = RankZeroServices.record
    seen = [0]

    def record(self: RankZeroServices, state: Any, report: Any) -> None:
        real_record(self, state, report)
        trips, seen[0] = wire.trips[seen[0]:], len(wire.trips)
        steps.append({"table": sum(trips), "other": len(trips) - sum(trips), "acks": observer.stats().acks})
        if stop is not None and state.step == stop_after:
            stop.set()

    monkeypatch.setattr(RankZeroServices, "record", record)
    s = LearnerSettings(model_path=model, run_dir=tmp, redis_url=redis_url, batch_size=BATCH, micro_batch_size=2,
                        lr=1e-4, loss={"kind": "tbrm", "beta": 0.5}, sample_timeout_s=2.0, port=0, torch_threads=1,
                        **kw)
    train(s, stop=stop)
    return steps, observer


@pytest.mark.parametrize("interval", [3, None], ids=["acks-after-checkpoint", "acks-after-step"])
def test_one_round_trip_per_step_and_acks_lag_the_policy(tmp_path, tiny_model_dir, redis_url, monkeypatch, interval):
    # prioritized (priorities written every step) and max_times_sampled 1 (with a checkpoint interval: deferred
    # acks, renewed leases): every per-step write of rank 0 is in play
    cfg = TableConfig(sampler=PrioritizedSampler(exponent=1.0), max_times_sampled=1)
    table = ReplayTable(connect(redis_url), cfg)
    table.insert(toy_trajectories(tiny_model_dir, 40))
    steps, observer = run(tmp_path / "run", tiny_model_dir, redis_url, monkeypatch, max_steps=8, table=cfg,
                          checkpoint_interval_steps=interval)
    assert len(steps) == 8
    # steady state: the step's sample is one round trip that also carries the acks, the priorities, the reference
    # caches and the renewals (the first step pays one more: nothing was prefetched yet). Other round trips of the
    # training thread (the learner status, the actor registry) are not the buffer's.
    assert [x["table"] for x in steps[1:]] == [1] * 7, steps
    # acks follow the policy, one round trip late, never early
    if interval == 3:  # held until the checkpoint after steps 3 and 6, sent with the next step's sample
        assert [x["acks"] for x in steps] == [0, 0, 0, 12, 12, 12, 24, 24]
    else:  # acked by the next step's sample
        assert [x["acks"] for x in steps] == [BATCH * k for k in range(8)]
    st = observer.stats()
    # at exit: every trained batch acked, the prefetched one given back (sampleable now, not after lease_s)
    assert (st.acks, st.leased, st.size) == (32, 0, 8)
    assert st.extra["expired_lease_items"] == BATCH
    assert len(observer.sample(8, 8, timeout_s=0.5).items) == 8


def test_a_stop_with_a_prefetched_batch_acks_the_released_and_returns_the_prefetched(
        tmp_path, tiny_model_dir, redis_url, monkeypatch):
    cfg = TableConfig(sampler=FifoSampler(), max_times_sampled=1)
    table = ReplayTable(connect(redis_url), cfg)
    trajs = toy_trajectories(tiny_model_dir, 16)
    table.insert(trajs)
    stop = threading.Event()
    steps, observer = run(tmp_path / "run", tiny_model_dir, redis_url, monkeypatch, stop=stop, stop_after=2,
                          table=cfg, checkpoint_interval_steps=None)
    assert len(steps) == 2 and [x["acks"] for x in steps] == [0, BATCH]
    st = observer.stats()
    assert (st.acks, st.leased, st.size) == (2 * BATCH, 0, 16 - 2 * BATCH)
    # the batch leased for step 3 is back at once, first in fifo order, handed out once before
    again = observer.sample(BATCH, 2, timeout_s=0.5)
    assert [it.info.item_id for it in again.items] == [t.traj_id for t in trajs[2 * BATCH:3 * BATCH]]
    assert all(it.info.times_sampled == 2 for it in again.items)
