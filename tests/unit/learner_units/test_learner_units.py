"""Fast checks of the learner's pieces: settings precedence, padding, micro-batch plans, metric reduction, the
LR schedule, weight export, and the non-blocking weight pusher against real HTTP endpoints."""

from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request

from actor_service.client import push_weights
from buffer.schema import ActorInfo, Trajectory, WeightsInfo
from learner.accumulate import reduce_metrics
from learner.batch import shard_items
from learner.engine import lr_lambda
from learner.model import collate, load_causal_lm, plan_micro_batches, reference_logprobs
from learner.push import WeightPusher
from learner.settings import LearnerSettings
from learner.weights import export_weights, hf_state_dict, sha256_file


def traj(prompt: list[int], response: list[int], group: str = "g", reward: float = 1.0) -> Trajectory:
    return Trajectory(
        prompt_id="p", group_id=group, prompt_token_ids=prompt, response_token_ids=response,
        behaviour_logprobs=[-1.0] * len(response), reward=reward, grade_status="correct", policy_version=0,
    )


# ---- settings ----

def test_settings_precedence_cli_env_toml(tmp_path, monkeypatch):
    toml = tmp_path / "run.toml"
    toml.write_text('[learner]\nlr = 1e-4\nbatch_size = 8\n[learner.loss]\nkind = "tbrm"\nbeta = 0.02\n'
                    '[learner.table]\nmax_times_sampled = 2\n')
    monkeypatch.setenv("TBRM_RUN_CONFIG", str(toml))
    monkeypatch.setenv("TBRM_LEARNER_BATCH_SIZE", "4")
    monkeypatch.setenv("TBRM_REDIS_URL", "redis://example:1/0")
    monkeypatch.setenv("TBRM_AUTH_TOKEN", "tok")
    s = LearnerSettings(lr=5e-5)
    assert (s.lr, s.batch_size, s.loss.beta, s.table.max_times_sampled) == (5e-5, 4, 0.02, 2)
    assert s.redis_url == "redis://example:1/0" and s.redacted()["auth_token"] == "***"
    with pytest.raises(ValueError, match="cosine schedule needs"):
        LearnerSettings(schedule={"kind": "cosine"})
    with pytest.raises(ValueError, match="extra"):
        LearnerSettings(unknown_field=1)


def test_lr_schedule_warmup_then_cosine():
    s = LearnerSettings(schedule={"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1}, max_steps=12)
    f = lr_lambda(s)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(7) == pytest.approx(0.55) and f(12) == pytest.approx(0.1)
    assert lr_lambda(LearnerSettings(schedule={"kind": "constant", "warmup_steps": 4}))(10) == 1.0


# ---- padding and micro-batches ----

def test_padding_does_not_change_logprobs(tiny_model_dir):
    torch.set_num_threads(1)
    model = load_causal_lm(tiny_model_dir, trainable=False)
    ts = [traj([5, 6, 7, 8, 9], [10, 11]), traj([5, 6], [12, 13, 14, 15]), traj([7], [])]
    mb = collate(ts)
    assert mb.prompt_len == 5 and mb.tokens.shape == (3, 4)
    assert mb.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    lp, v0 = reference_logprobs(model, mb)
    for i, t in enumerate(ts):
        alone_lp, alone_v0 = reference_logprobs(model, collate([t]))
        n = len(t.response_token_ids)
        torch.testing.assert_close(lp[i, :n], alone_lp[0, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(v0[i], alone_v0[0], atol=1e-5, rtol=0)
    # and equal to a plain unpadded forward of prompt + response
    full = torch.tensor([ts[1].prompt_token_ids + ts[1].response_token_ids])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0]
    logp = torch.log_softmax(logits, -1)
    want = [logp[1 + h, tok].item() for h, tok in enumerate(ts[1].response_token_ids)]
    assert lp[1].tolist() == pytest.approx(want, abs=1e-5)
    assert v0[1].item() == pytest.approx(torch.logsumexp(logits[1], -1).item(), abs=1e-5)


def test_micro_batch_plans():
    ts = [traj([1] * 3, [2] * 2, group=g) for g in "aabbbc"]
    assert plan_micro_batches(ts, 4) == [[0, 1, 2, 3], [4, 5]]
    # group-aligned: whole groups per micro-batch where they fit
    assert plan_micro_batches(ts, 4, group_aligned=True) == [[0, 1], [2, 3, 4, 5]]
    # token budget: 5 padded tokens per row, at most 10 per micro-batch
    assert plan_micro_batches(ts, 4, max_tokens=10) == [[0, 1], [2, 3], [4, 5]]


def test_shards_cover_the_batch_once_and_keep_groups_whole():
    from buffer.schema import SampledItem, SampleInfo

    items = [
        SampledItem(info=SampleInfo(item_id=str(i), times_sampled=1, age_versions=0, buffer_size=8, inserted_at=0),
                    trajectory=traj([1], [2], group=g))
        for i, g in enumerate("aaabbcdd")
    ]
    plain = [[it.info.item_id for it in shard_items(items, r, 2)] for r in range(2)]
    assert plain == [["0", "2", "4", "6"], ["1", "3", "5", "7"]]
    grouped = [shard_items(items, r, 2, by_group=True) for r in range(2)]
    assert sorted(it.info.item_id for s in grouped for it in s) == [str(i) for i in range(8)]
    for g in "abcd":
        assert sum(any(it.trajectory.group_id == g for it in s) for s in grouped) == 1
    assert [len(s) for s in grouped] == [5, 3]  # a(3)->0, b(2)->1, c(1)->1, d(2)->0 (ties: lowest rank)


def test_reduce_metrics_recombines_mean_std_max():
    rng = torch.Generator().manual_seed(0)
    r = torch.randn(10, generator=rng, dtype=torch.float64)
    parts = [r[:3], r[3:]]
    partials = [
        (len(p) / 10, {"residual_mean": p.mean().item(), "residual_std": p.std(unbiased=False).item(),
                       "residual_abs_max": p.abs().max().item()})
        for p in parts
    ]
    out = reduce_metrics(partials, world_size=1)
    assert out["residual_mean"] == pytest.approx(r.mean().item())
    assert out["residual_std"] == pytest.approx(r.std(unbiased=False).item())
    assert out["residual_abs_max"] == pytest.approx(r.abs().max().item())


# ---- weights ----

def test_export_dedupes_tied_tensors_hashes_and_prunes(tiny_model_dir, tmp_path):
    model = load_causal_lm(tiny_model_dir, trainable=False)
    sd = hf_state_dict(model)
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    infos = [export_weights(model, tmp_path, v, keep=2) for v in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy-v00000002.safetensors", "policy-v00000003.safetensors"]
    assert infos[-1].sha256 == sha256_file(Path(infos[-1].path))
    assert infos[-1].nbytes == Path(infos[-1].path).stat().st_size > 0
    half = export_weights(model, tmp_path / "bf16", 1, dtype="bfloat16")
    from safetensors.torch import load_file

    assert load_file(half.path)["model.norm.weight"].dtype == torch.bfloat16


# ---- pusher ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Actor:
    """A real HTTP weights endpoint; `delay_s` makes it hang (a stuck actor)."""

    def __init__(self, delay_s: float = 0.0, have_version: int = 0) -> None:
        self.versions: list[int] = []
        self.have = have_version
        app = FastAPI()

        @app.post("/v1/weights")
        async def weights(request: Request) -> dict:
            body = await request.body()
            time.sleep(delay_s)  # blocks the server: a hung actor
            v = int(request.headers["X-TBRM-Policy-Version"])
            if v <= self.have:
                # the actor's wording: the pusher books a 409 as delivered only for the version the actor holds
                raise HTTPException(409, f"policy version {v} is not newer than the actor's current version {self.have}")
            self.have = v
            self.versions.append(v)
            return {"policy_version": v, "sha256": "x", "nbytes": len(body), "receive_s": 0.0, "load_s": 0.0}

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def test_pusher_never_blocks_and_catches_up(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"\0" * 100)
    good, stuck, knows = Actor(), Actor(delay_s=3.0), Actor(have_version=5)
    actors = [
        ActorInfo(actor_id="good", url=good.url, started_at=1.0),
        ActorInfo(actor_id="stuck", url=stuck.url, started_at=1.0),
        ActorInfo(actor_id="dead", url=f"http://127.0.0.1:{_free_port()}", started_at=1.0),
        ActorInfo(actor_id="knows", url=knows.url, started_at=1.0),
    ]
    pusher = WeightPusher(lambda: list(actors), token="t", timeout_s=0.5, retry_s=3.0, push_fn=push_weights)
    try:
        info = WeightsInfo(version=5, sha256=sha256_file(f), nbytes=100, path=str(f))
        t0 = time.monotonic()
        assert pusher.sync(info) == 4
        assert time.monotonic() - t0 < 1.0  # returns at once (the stuck actor takes 3 s), pushes run in the pool
        assert pusher.sync(info) == 0  # one push in flight per actor
        assert pusher.wait_idle(5.0)
        d = pusher.delivered()
        assert d["good"] == 5 and d["knows"] == 5  # 409 = already has it
        assert d["stuck"] == -1 and d["dead"] == -1
        assert pusher.stats.pushes_failed == 2 and "stuck" in pusher.stats.last_error + "dead"
        assert pusher.sync(info) == 0  # failed ones wait push_retry_s before the next try
        time.sleep(3.1)
        assert pusher.sync(info) == 2
        pusher.wait_idle(5.0)
        # an actor that restarted (new started_at) lost its weights: caught up again
        actors[0] = ActorInfo(actor_id="good", url=good.url, started_at=2.0)
        good.have = 0
        assert pusher.sync(info) >= 1
        pusher.wait_idle(5.0)
        assert good.versions == [5, 5]
        assert math.isfinite(pusher.stats.last_latency_s)
    finally:
        pusher.close()
        for a in (good, stuck, knows):
            a.stop()


def test_deepspeed_config_keeps_user_keys_and_owns_batch_keys(tmp_path):
    import json

    from learner.engine import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "train_batch_size": 999}))
    cfg = deepspeed_config(LearnerSettings(ds_config_path=user, micro_batch_size=4, grad_clip=0.5), world_size=2)
    assert cfg["bf16"] == {"enabled": True} and cfg["zero_optimization"] == {"stage": 1}
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 4, 1)
    assert cfg["managed_gradient_accumulation"] is False and cfg["gradient_clipping"] == 0.5
    assert deepspeed_config(LearnerSettings(zero_stage=0, grad_clip=None), 1)["zero_optimization"] == {"stage": 0}
    assert "gradient_clipping" not in deepspeed_config(LearnerSettings(grad_clip=None), 1)
