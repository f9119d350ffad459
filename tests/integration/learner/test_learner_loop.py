"""The learner loop against a real redis-server, the real buffer library and real DeepSpeed (CPU, gloo).

Trajectories are real toy problems tokenized with the tiny model's tokenizer; weights go over real HTTP.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from learner_helpers import WeightReceiver, free_port, toy_trajectories

from buffer.client import ActorRegistry, LearnerStatusStore, ReplayTable, WeightsStore, connect
from buffer.schema import ActorInfo, FifoSampler, TableConfig
from learner.settings import LearnerSettings
from learner.train import train

TOKEN = "test-token"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def settings(tmp: Path, model: Path, redis_url: str, **kw: object) -> LearnerSettings:
    base: dict[str, object] = dict(
        model_path=model, run_dir=tmp, redis_url=redis_url, auth_token=TOKEN, batch_size=4, micro_batch_size=2,
        lr=1e-3, loss={"kind": "tbrm", "beta": 0.5}, sample_timeout_s=5.0, port=0, push_timeout_s=10.0,
        push_retry_s=0.2, checkpoint_interval_steps=None, torch_threads=1,
    )
    base.update(kw)
    return LearnerSettings(**base)


def test_loop_trains_acks_caches_reference_exports_and_pushes(tmp_path, tiny_model_dir, redis_url):
    r = connect(redis_url)
    table = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=2))
    trajs = toy_trajectories(tiny_model_dir, 8)
    table.insert(trajs)
    registry = ActorRegistry(r)
    live_actor = WeightReceiver(free_port(), TOKEN)
    late_actor = None
    # a dead actor (nothing listens) must not block or break anything
    registry.register(ActorInfo(actor_id="dead", url=f"http://127.0.0.1:{free_port()}"), ttl_s=60)
    registry.register(ActorInfo(actor_id="a0", url=live_actor.url), ttl_s=60)
    try:
        s = settings(tmp_path / "run", tiny_model_dir, redis_url, max_steps=4, push_interval_steps=2)
        res = train(s)
        assert (res.step, res.policy_version) == (4, 4)

        # fifo + max_times_sampled=2: step 3 replays step 1's items (step 2's batch was leased, a step ahead, before
        # step 1's ack returned them), so their reference log-probs come from the cache
        h = res.history
        assert [x["ref_computed"] for x in h] == [4, 4, 0, 0]
        assert [x["times_sampled_mean"] for x in h] == [1.0, 1.0, 2.0, 2.0]
        for x in h:
            assert math.isfinite(x["loss"]) and x["grad_norm"] > 0
            assert x["frac_correct"] + x["frac_incorrect"] == 1.0
        stats = table.stats()
        assert stats.acks == 16 and stats.size == 0 and stats.leased == 0
        # the cache holds what the learner computed: equal to a fresh reference forward
        from learner.model import collate, load_causal_lm, reference_logprobs

        ref = load_causal_lm(tiny_model_dir, trainable=False)
        lp, _ = reference_logprobs(ref, collate(trajs[:1]))
        # TBRM moved the policy toward pi_ref * exp(r / beta): the summed log-ratio rose on the rewarded responses
        # relative to the unrewarded ones
        mb = collate(trajs)
        lp_ref, _ = reference_logprobs(ref, mb)
        lp_new, _ = reference_logprobs(res.model.eval(), mb)
        ratio = (lp_new - lp_ref).sum(dim=1)
        good = torch.tensor([t.reward == 1.0 for t in trajs])
        assert good.any() and (~good).any()
        assert ratio[good].mean() > ratio[~good].mean()
        lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2, 3, 4]
        assert lines[0]["ref_computed"] == 4 and lp.shape[1] == len(trajs[0].response_token_ids)

        # weights: exported at versions 2 and 4, recorded in Redis, loadable by transformers with identical tensors
        latest = WeightsStore(r).latest()
        assert latest is not None and latest.version == 4
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        from learner.weights import sha256_file

        assert sha256_file(Path(latest.path)) == latest.sha256
        hf_dir = tmp_path / "hf"
        shutil.copytree(tiny_model_dir, hf_dir)
        shutil.copy(latest.path, hf_dir / "model.safetensors")
        loaded = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True).state_dict()
        trained = res.model.state_dict()
        assert loaded.keys() == trained.keys()
        for k in trained:
            assert torch.equal(loaded[k], trained[k]), k
        base = load_file(str(tiny_model_dir / "model.safetensors"))
        assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])

        # push: the live actor got v2 and v4 (bodies verified by sha256 on arrival); the dead one never blocked
        assert [x["version"] for x in live_actor.received] == [2, 4]
        assert live_actor.received[-1]["sha256"] == latest.sha256

        # a late joiner is caught up with the latest version by the next push round (a fresh learner run resumes)
        late_actor = WeightReceiver(free_port(), TOKEN)
        registry.register(ActorInfo(actor_id="late", url=late_actor.url), ttl_s=60)
        table.insert(toy_trajectories(tiny_model_dir, 4, seed=1))
        res2 = train(s.model_copy(update={"max_steps": 5}))
        assert res2.step == 5
        # the late actor got the resumed learner's v4 at start-up, then the final v5 at exit; a0 already had v4
        assert [x["version"] for x in late_actor.received] == [4, 5]
        assert [x["version"] for x in live_actor.received] == [2, 4, 5]
        status = LearnerStatusStore(r).get()
        assert status is not None and status.policy_version == 5 and status.state == "stopped"
    finally:
        live_actor.stop()
        if late_actor:
            late_actor.stop()


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_model_dir, redis_url):
    r = connect(redis_url)
    table = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    trajs = toy_trajectories(tiny_model_dir, 16, seed=3)

    table.insert(trajs)
    full = train(settings(tmp_path / "a", tiny_model_dir, redis_url, max_steps=4, checkpoint_interval_steps=2))

    # the same data again: stop after 2 steps (checkpoint), then a new run resumes from it
    table.reset()
    table.insert(trajs)
    first = train(settings(tmp_path / "b", tiny_model_dir, redis_url, max_steps=2, checkpoint_interval_steps=2))
    assert first.step == 2
    resumed = train(settings(tmp_path / "b", tiny_model_dir, redis_url, max_steps=4, checkpoint_interval_steps=2))
    assert [x["step"] for x in resumed.history] == [3, 4]
    keys = ("loss", "residual_mean", "residual_std", "v0_mean", "grad_norm", "lr")
    assert [[x[k] for k in keys] for x in resumed.history] == [[x[k] for k in keys] for x in full.history[2:]]
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    # resume='never' starts again from step 0
    table.reset()
    table.insert(trajs[:4])
    fresh = train(settings(tmp_path / "b", tiny_model_dir, redis_url, max_steps=1, resume="never"))
    assert fresh.history[0]["loss"] == full.history[0]["loss"]


def test_sync_mode_trains_only_on_current_version(tmp_path, tiny_model_dir, redis_url):
    r = connect(redis_url)
    table = ReplayTable(r, TableConfig(sampler=FifoSampler()))
    table.insert(toy_trajectories(tiny_model_dir, 4, policy_version=0, seed=1))
    table.insert(toy_trajectories(tiny_model_dir, 4, policy_version=0, seed=2))  # stale once v1 exists
    table.insert(toy_trajectories(tiny_model_dir, 4, policy_version=1, seed=3))
    res = train(settings(tmp_path, tiny_model_dir, redis_url, max_steps=2, sync=True, push_interval_steps=5))
    assert [x["version_lag_max"] for x in res.history] == [0.0, 0.0]
    stats = table.stats()
    assert stats.size == 0 and stats.acks == 12  # 8 trained, 4 stale ones consumed without training
    assert WeightsStore(r).latest().version == 2  # sync pushes every step


@pytest.mark.parametrize("loss", [
    {"kind": "grpo", "clip_eps": 0.2},
    {"kind": "tbrm", "beta": 0.1, "calibrated": True},
    {"kind": "tbrm", "beta": 0.1, "centered": True},
])
def test_other_objectives_run(tmp_path, tiny_model_dir, redis_url, loss):
    r = connect(redis_url)
    table = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=2))
    table.insert(toy_trajectories(tiny_model_dir, 4, seed=5))
    res = train(settings(tmp_path, tiny_model_dir, redis_url, max_steps=2, loss=loss))
    assert res.step == 2 and all(math.isfinite(x["loss"]) for x in res.history)
    if loss.get("calibrated"):
        # the reference V(s_1) was cached with the items and the residual at step 1 (pi = pi_ref) is -r/beta
        assert "ref_v0_mean" in res.history[0]
        assert res.history[0]["residual_mean"] == pytest.approx(-res.history[0]["batch_reward_mean"] / 0.1, abs=1e-3)
    if loss.get("centered"):
        # groups of 2 reach the loss whole: each group's residuals are centered, so their mean is 0
        assert all(abs(x["residual_mean"]) < 1e-3 for x in res.history)
    if loss["kind"] == "grpo" or loss.get("centered"):
        assert all(0.0 <= x["flat_group_frac"] <= 1.0 for x in res.history)  # groups reach the loss
