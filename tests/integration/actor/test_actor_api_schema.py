"""Schemathesis against the actor's OpenAPI over real HTTP (shared vLLM engine): no 5xx on any generated input."""

from __future__ import annotations

import schemathesis
from actor_helpers import ServerThread
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from actor_service.settings import ActorSettings


def test_actor_api_never_errors(actor_engine) -> None:
    from actor_service.app import create_app

    settings = ActorSettings(run_loop=False, auth_token="schema-token", max_model_len=256, max_tokens=16,
                             generate_max_tokens=8, generate_max_samples=8, max_weight_bytes=2**20)
    srv = ServerThread(create_app(settings, engine=actor_engine))
    try:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/health", "/metrics", "/v1/status", "/v1/config",
                                                  "/v1/generate", "/v1/weights"}
        for op in operations:

            @given(case=op.as_strategy())
            @hsettings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                response = case.call(base_url=srv.url, timeout=60)
                assert response.status_code < 500, (case.method, case.path, response.status_code,
                                                    response.text[:500])

            check()
    finally:
        srv.stop()
