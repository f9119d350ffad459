"""Replay feedback and the stability guard in the real learner loop (real redis-server, DeepSpeed on CPU).

- residual priorities: after a step every trained item's priority is |delta| + eps (the learner's own delta),
  new items enter at the running maximum, and the prioritized sampler then prefers the high-residual items;
- reuse: samples_per_insert 2 and max_times_sampled 2 train every item exactly twice;
- the guard: a poison trajectory (a reward whose r/beta overflows fp32) skips the step and is never published, a
  huge lr is detected and answered by a rollback / lr back-off, and the published weights stay finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from learner_helpers import toy_trajectories
from safetensors.torch import load_file

from buffer.client import ReplayTable, WeightsStore, connect
from buffer.schema import FifoSampler, PrioritizedSampler, RateLimiterConfig, TableConfig
from learner.settings import LearnerSettings
from learner.train import train


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def settings(tmp: Path, model: Path, redis_url: str, **kw: object) -> LearnerSettings:
    base: dict[str, object] = dict(
        model_path=model, run_dir=tmp, redis_url=redis_url, batch_size=4, micro_batch_size=2, lr=1e-3,
        loss={"kind": "tbrm", "beta": 0.01}, sample_timeout_s=2.0, port=0, checkpoint_interval_steps=None,
        torch_threads=1,
    )
    base.update(kw)
    return LearnerSettings(**base)


def metrics_lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def priority_of(table: ReplayTable, item_id: str) -> float:
    got = table.get(item_id)
    assert got is not None, item_id
    return float(got[1]["priority"])


def test_residual_priorities_are_written_back_and_steer_sampling(tmp_path, tiny_model_dir, redis_url):
    r = connect(redis_url)
    table = ReplayTable(r, TableConfig(sampler=PrioritizedSampler(exponent=1.0), max_times_sampled=0))
    trajs = toy_trajectories(tiny_model_dir, 8)
    table.insert(trajs)
    s = settings(tmp_path / "run", tiny_model_dir, redis_url, max_steps=2, batch_size=8, micro_batch_size=4,
                 lr=1e-6, priorities={"eps": 0.5})
    res = train(s)
    h = res.history
    assert res.step == 2
    # both reward classes in the batch: residuals split by class; r/beta = 100 makes the correct ones far larger
    assert h[0]["residual_mean_correct"] < -50 < h[0]["residual_mean_incorrect"]
    assert math.isfinite(h[0]["kl_snis"]) and 1.0 <= h[0]["kl_snis_ess"] <= 8.0
    assert h[0]["age_s_mean"] >= 0
    # every item was trained in step 2 (max_times_sampled 0 keeps them): its priority is |delta| + eps from that
    # step; nothing is left at the default 1.0
    prios = {t.traj_id: priority_of(table, t.traj_id) for t in trajs}
    for t in trajs:
        assert prios[t.traj_id] > 0.5 and prios[t.traj_id] != 1.0
    good = [p for t, p in zip(trajs, prios.values(), strict=True) if t.reward > 0]
    bad = [p for t, p in zip(trajs, prios.values(), strict=True) if t.reward <= 0]
    assert good and bad and min(good) > 10 * max(bad)
    # a new item enters at the largest priority ever set (step 1's residuals included), so it is trained soon
    fresh = toy_trajectories(tiny_model_dir, 1, seed=7)[0]
    table.insert([fresh])
    assert priority_of(table, fresh.traj_id) >= max(prios.values())
    # the sampler follows the priorities: a rewarded (high-|delta|) item is drawn far more often than an unrewarded
    # one (expected ratio = ratio of priorities, > 10 here; checked per item with a wide margin over 100 draws)
    counts = {"good": 0, "bad": 0}
    for _ in range(100):
        got = table.sample(1, learner_version=2)
        t = got.items[0].trajectory
        counts["good" if t.reward > 0 else "bad"] += t.traj_id != fresh.traj_id
        table.ack(got.lease_id)
    assert counts["good"] / len(good) > 3 * counts["bad"] / len(bad)


def test_reuse_two_trains_every_item_exactly_twice(tmp_path, tiny_model_dir, redis_url):
    r = connect(redis_url)
    cfg = TableConfig(
        sampler=FifoSampler(), max_times_sampled=2,
        rate_limiter=RateLimiterConfig(min_size_to_sample=4, samples_per_insert=2.0, error_buffer=8.0),
    )
    table = ReplayTable(r, cfg)
    trajs = toy_trajectories(tiny_model_dir, 8)
    table.insert(trajs, timeout_s=5)
    res = train(settings(tmp_path / "run", tiny_model_dir, redis_url, max_steps=4, table=cfg))
    assert res.step == 4
    st = table.stats()
    assert (st.inserts, st.samples, st.acks, st.size, st.leased) == (8, 16, 16, 0, 0)
    # fifo: an acked item returns at its place in insertion order, so each batch is replayed as soon as it can be:
    # two steps later (the next batch was leased a step ahead, before the ack returned this one)
    assert [x["times_sampled_mean"] for x in res.history] == [1.0, 1.0, 2.0, 2.0]


def test_guard_skips_a_poison_step_and_publishes_only_finite_weights(tmp_path, tiny_model_dir, redis_url):
    r = connect(redis_url)
    table = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    trajs = toy_trajectories(tiny_model_dir, 12)
    # reward 1e38 is a finite float, but r/beta overflows fp32 and delta^2 is inf: a non-finite loss
    trajs[1] = trajs[1].model_copy(update={"reward": 1e38})
    table.insert(trajs)
    s = settings(tmp_path / "run", tiny_model_dir, redis_url, max_steps=2)
    res = train(s)
    assert res.step == 2  # the run went on
    lines = metrics_lines(tmp_path / "run")
    assert [x["step"] for x in lines] == [1, 2]
    assert lines[-1]["guard_skipped_steps"] == 1.0
    for x in lines:
        assert math.isfinite(x["loss"])
    st = table.stats()
    # the poison item was acked away; its 3 batch-mates stay leased until their lease expires, then come back
    assert (st.acks, st.leased) == (8 + 1, 3)
    latest = WeightsStore(r).latest()
    assert latest is not None and latest.version == 2
    assert_published_weights_finite(r)


def assert_published_weights_finite(r) -> None:
    latest = WeightsStore(r).latest()
    assert latest is not None
    for name, w in load_file(latest.path).items():
        assert torch.isfinite(w).all(), name


def test_guard_backs_off_the_lr_after_a_divergence(tmp_path, tiny_model_dir, redis_url):
    r = connect(redis_url)
    table = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=0))
    table.insert(toy_trajectories(tiny_model_dir, 8))
    # lr 3.0 wrecks the tiny model in one step; the next step's residuals (on the wrecked weights) blow past the bound
    s = settings(
        tmp_path / "run", tiny_model_dir, redis_url, max_steps=5, lr=3.0, zero_stage=0,
        guard={"max_residual_abs": 150.0, "patience_steps": 1, "response": "lr_backoff", "lr_backoff_factor": 0.01},
    )
    res = train(s)
    assert res.step == 5
    lines = metrics_lines(tmp_path / "run")
    assert lines[0]["guard_response"] is None and lines[0]["residual_abs_max"] < 150
    # ZeRO-0: the learner measures the pre-clip norm itself (DeepSpeed reports none for fp32); TBRM's first
    # gradient is far above grad_clip = 1
    assert lines[0]["grad_norm"] > 1.0 and lines[0]["grad_clipped"] == 1.0
    fired = [x["step"] for x in lines if x["guard_response"] == "lr_backoff"]
    assert fired and fired[0] == 2, [x["residual_abs_max"] for x in lines]
    assert [x["lr"] for x in lines if x["step"] > fired[0]][0] == pytest.approx(3.0 * 0.01 ** len(fired[:1]))
    assert_published_weights_finite(r)


def test_guard_rolls_back_to_a_checkpoint_before_the_blow_up(tmp_path, tiny_model_dir, redis_url):
    r = connect(redis_url)
    table = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    normal = toy_trajectories(tiny_model_dir, 24)
    # steps 1-3 train on normal data; step 4's batch carries rewards whose r/beta is 1e5: residuals far past the
    # bound from that step on (a divergence injected through the data, detected on step 4's forward pass)
    wild = [t.model_copy(update={"reward": 1e3}) for t in toy_trajectories(tiny_model_dir, 4, seed=3)]
    table.insert(normal[:12] + wild + normal[12:])
    s = settings(
        tmp_path / "run", tiny_model_dir, redis_url, max_steps=6, checkpoint_interval_steps=1, keep_checkpoints=4,
        ack_after_checkpoint=False,
        guard={"max_residual_abs": 5e3, "patience_steps": 1, "response": "rollback", "lr_backoff_factor": 0.5},
    )
    res = train(s)
    lines = metrics_lines(tmp_path / "run")
    assert [x["guard_response"] for x in lines] == [None, None, None, "rollback", None, None]
    # the strike at step 4 was measured on step 3's weights, so the checkpoint of step 2 was restored and published
    # as a new version (5): versions skip one and never repeat
    assert [x["policy_version"] for x in lines] == [1, 2, 3, 4, 6, 7]
    assert res.policy_version == 7
    assert lines[4]["lr"] == pytest.approx(lines[2]["lr"] * 0.5)
    assert_published_weights_finite(r)
