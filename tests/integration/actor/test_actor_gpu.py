"""A GPU actor applies a push (issue 15), `gpu`-marked: deselected by default, skipped without CUDA
(tests/conftest.py). On a GPU machine (the CUDA vLLM build of deploy/requirements-gpu.txt) the session engine of
the actor tests runs on the GPU; a push over real HTTP, relayed to a second GPU engine, must change what both
serve to exactly what transformers computes with the pushed weights."""

from __future__ import annotations

import pytest
from actor_helpers import ServerThread, hf_greedy

from actor_service.client import push_weights
from actor_service.settings import ActorSettings

pytestmark = pytest.mark.gpu
TOKEN = "gpu-token"


def model_device(worker) -> str:
    return str(next(worker.get_model().parameters()).device)


def test_gpu_actor_applies_a_relayed_push(actor_engine, more_engines, make_variant) -> None:
    from actor_service.app import create_app

    (second,) = more_engines(1)
    servers = []
    try:
        for i, eng in enumerate((actor_engine, second)):
            assert eng._call(lambda eng=eng: eng.llm.collective_rpc(model_device))[0].startswith("cuda")
            settings = ActorSettings(run_loop=False, auth_token=TOKEN, max_model_len=256, actor_id=f"gpu{i}")
            servers.append(ServerThread(create_app(settings, engine=eng)))
        variant = make_variant(71)
        version = max(actor_engine.version, second.version) + 1
        answer = push_weights(servers[0].url, variant / "model.safetensors", version, TOKEN, timeout_s=120,
                              relay=[servers[1].url])
        assert answer.policy_version == version and [h.status for h in answer.relayed] == [200]
        prompts = [actor_engine.text_token_ids("17-5=")]
        expected = hf_greedy(variant, prompts, 10)
        for eng in (actor_engine, second):
            gen = eng.generate(prompts, temperature=0.0, max_tokens=10)
            assert gen.version_start == version
            assert [g[0].token_ids for g in gen.samples] == expected
    finally:
        for srv in servers:
            srv.stop()
