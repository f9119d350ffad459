"""Verified delivery: after a push the actor scores the canary sequence with the weights it applied; the learner's
pusher compares that with its own log-probs for the version. A correct push agrees with transformers; a corrupted
apply (vLLM's in-place reload without re-tying the embedding: the head keeps the old matrix) is accepted by every
other check (200, sha256 fine) and caught only by the canary."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from actor_helpers import ServerThread, hf_logprobs

from actor_service.client import push_weights
from actor_service.schema import canary_token_ids
from actor_service.settings import ActorSettings
from buffer.client import ActorInfo, WeightsInfo
from learner.export import canary_logprobs
from learner.push import WeightPusher

TOKEN = "canary-token"


@pytest.fixture(scope="module")
def server(actor_engine, tiny_model_dir: Path):
    from actor_service.app import create_app

    settings = ActorSettings(run_loop=False, auth_token=TOKEN, max_model_len=256, actor_id="canary-test")
    srv = ServerThread(create_app(settings, engine=actor_engine))
    yield srv
    srv.stop()


def learner_canary(model_dir: Path) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return canary_logprobs(model)


LIVE: list[ActorInfo] = []


def pushed_through(pusher: WeightPusher, url: str, model_dir: Path, version: int) -> None:
    """What the learner does after exporting `version`: register its canary log-probs, push to the live actor."""
    info = WeightsInfo(version=version, sha256="", nbytes=0, path=str(model_dir / "model.safetensors"))
    LIVE[:] = [ActorInfo(actor_id="canary-test", url=url, policy_version=version - 1, started_at=1.0)]
    pusher.expect_canary(version, learner_canary(model_dir))
    assert pusher.sync(info) == 1
    assert pusher.wait_idle(120)


def test_canary_matches_transformers_and_catches_a_stale_tied_head(server, actor_engine, make_variant,
                                                                   caplog) -> None:
    a, b = make_variant(41, emb_std=0.4, lin_gain=1.0), make_variant(42, emb_std=0.4, lin_gain=1.0)
    ids = canary_token_ids(actor_engine.spec["model.embed_tokens.weight"].shape[0])
    resp = push_weights(server.url, a / "model.safetensors", actor_engine.version + 1, TOKEN, timeout_s=60)
    assert resp.canary_logprobs == pytest.approx(hf_logprobs(a, ids[:1], ids[1:]), abs=2e-3)

    pusher = WeightPusher(lambda: LIVE, TOKEN, timeout_s=60, canary_max_drift=0.05)
    try:
        pushed_through(pusher, server.url, b, actor_engine.version + 1)
        good = pusher.canary_drift()["canary-test"]["drift"]
        assert good < 0.01 and pusher.stats.canary_alarms == 0
        # corrupt the apply: the engine skips re-tying the embedding (what vLLM's reload alone does)
        actor_engine.retie_embeddings = False
        try:
            with caplog.at_level(logging.WARNING, logger="learner.push"):
                pushed_through(pusher, server.url, a, actor_engine.version + 1)
        finally:
            actor_engine.retie_embeddings = True
        assert pusher.stats.pushes_ok == 2 and pusher.stats.pushes_failed == 0  # nothing else noticed
        assert pusher.canary_drift()["canary-test"]["drift"] > 0.05
        assert pusher.stats.canary_alarms == 1
        assert "canary log-probs" in caplog.text
    finally:
        pusher.close()


def test_a_catch_up_between_apply_and_canary_is_compared_with_its_own_version(server, actor_engine, make_variant,
                                                                               monkeypatch) -> None:
    """The actor's feed may apply a newer version from the learner's file (catch-up) after a push's apply and
    before its canary is scored: the answer names the version scored, and the learner compares with that one's
    log-probs instead of raising a false alarm (seen in a default toy run: 4 of ~1,100 pushes, drift 0.05-0.29)."""
    a, b = make_variant(43, emb_std=0.4, lin_gain=1.0), make_variant(44, emb_std=0.4, lin_gain=1.0)
    pushed = actor_engine.version + 1
    real_score = actor_engine.score

    def score_after_a_catch_up(token_ids: list[int]) -> tuple[list[float], int]:
        actor_engine.update_weights(b / "model.safetensors", pushed + 1)  # what the feed's catch-up does
        return real_score(token_ids)

    monkeypatch.setattr(actor_engine, "score", score_after_a_catch_up)
    pusher = WeightPusher(lambda: LIVE, TOKEN, timeout_s=60, canary_max_drift=0.05)
    try:
        pusher.expect_canary(pushed + 1, learner_canary(b))
        pushed_through(pusher, server.url, a, pushed)
        assert actor_engine.version == pushed + 1 and pusher.stats.pushes_ok == 1
        assert pusher.canary_drift()["canary-test"] == {"version": float(pushed + 1), "drift": pytest.approx(0, abs=0.01)}
        assert pusher.stats.canary_alarms == 0
    finally:
        pusher.close()
    monkeypatch.undo()
    ids = canary_token_ids(actor_engine.spec["model.embed_tokens.weight"].shape[0])
    resp = push_weights(server.url, a / "model.safetensors", actor_engine.version + 1, TOKEN, timeout_s=60)
    assert resp.canary_version == resp.policy_version
    assert resp.canary_logprobs == pytest.approx(hf_logprobs(a, ids[:1], ids[1:]), abs=2e-3)
