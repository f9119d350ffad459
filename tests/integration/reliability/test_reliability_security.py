"""Abuse tests over real HTTP for the services without an engine (reward, buffer API, learner status), issue 9:

- every mutating route (POST/PUT/PATCH/DELETE) other than the documented read-only compute routes answers 401
  without a token, with a wrong one, with an empty one and with another scheme; with no token configured it
  refuses too and says to set TBRM_AUTH_TOKEN; a property-based run of schema-valid requests without a token
  changes nothing;
- every POST route answers 413 to a body over the service's limit, declared (Content-Length) or streamed
  (chunked, no Content-Length), and keeps serving afterwards.

The actor (vLLM engine) has the same checks in test_reliability_actor.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from reliability_helpers import (
    READ_ONLY_COMPUTE,
    ServerThread,
    app_routes,
    assert_413,
    assert_refused_401,
    mutating_routes,
    openapi_routes,
)

TOKEN = "reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
BODY_LIMIT = 8 * 1024


# ---------------------------------------------------------------- the apps, each built by its create_app(settings)


@pytest.fixture(scope="module")
def reward() -> Iterator[ServerThread]:
    from reward.app import create_app
    from reward.settings import RewardSettings

    app = create_app(RewardSettings(workers=1, soft_timeout_s=2.0, hard_timeout_s=4.0, max_body_bytes=BODY_LIMIT))
    srv = ServerThread(app)
    srv.app = app
    yield srv
    srv.stop()


def _buffer_app(redis_url: str, export_dir: Path, token: str | None):
    from buffer.app import create_app
    from buffer.schema import TableConfig
    from buffer.settings import BufferSettings

    return create_app(BufferSettings(redis_url=redis_url, auth_token=token, export_dir=export_dir,
                                     max_body_bytes=BODY_LIMIT, table=TableConfig(max_size=100)))


@pytest.fixture(scope="module")
def buffer(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    export_dir = tmp_path_factory.mktemp("exports")
    app = _buffer_app(redis_server.url, export_dir, TOKEN)
    srv = ServerThread(app)
    srv.app, srv.export_dir = app, export_dir
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def learner() -> Iterator[ServerThread]:
    from learner.app import create_app
    from learner.live import LiveStatus
    from learner.settings import LearnerSettings

    app = create_app(LearnerSettings(auth_token=TOKEN, model_path="/nonexistent"),
                     LiveStatus(state="running", step=2, policy_version=2))
    srv = ServerThread(app)
    srv.app = app
    yield srv
    srv.stop()


# ---------------------------------------------------------------- 401


def test_every_mutating_route_is_known_and_documented(reward, buffer, learner) -> None:
    """No hidden routes; the only unauthenticated mutating routes are the documented read-only compute ones."""
    for name, srv in (("reward", reward), ("buffer", buffer), ("learner", learner)):
        assert app_routes(srv.app) <= openapi_routes(srv.app) | {("HEAD", p) for _, p in app_routes(srv.app)}, name
        assert READ_ONLY_COMPUTE[name] <= mutating_routes(srv.app), name
    assert mutating_routes(reward.app) == READ_ONLY_COMPUTE["reward"]  # the reward service holds no secrets
    assert mutating_routes(learner.app) == set()  # the learner's HTTP server is read-only by design
    assert mutating_routes(buffer.app) == {("POST", f"/v1/admin/{a}") for a in ("pause", "resume", "reset", "export")}


def test_buffer_mutating_routes_answer_401(buffer, redis_url: str) -> None:
    routes = sorted(mutating_routes(buffer.app) - READ_ONLY_COMPUTE["buffer"])
    assert routes
    for method, path in routes:
        for body in (b'{"what": "sampling"}', b'{"name": "snap"}', b"{}"):
            assert_refused_401(buffer.url, method, path, body, JSON)


def test_unconfigured_token_refuses_and_says_so(redis_url: str, tmp_path: Path) -> None:
    app = _buffer_app(redis_url, tmp_path, None)
    srv = ServerThread(app)
    try:
        for method, path in sorted(mutating_routes(app)):
            for auth in ({}, AUTH, {"Authorization": "Bearer"}):
                r = httpx.request(method, srv.url + path, content=b"{}", headers={**JSON, **auth}, timeout=30.0)
                assert r.status_code == 401 and "set TBRM_AUTH_TOKEN" in r.json()["detail"], (path, r.text)
    finally:
        srv.stop()


def test_unauthenticated_valid_requests_change_nothing(buffer, redis_url: str) -> None:
    """Property-based: schema-valid admin requests (schemathesis' generator) without the right token all get 401,
    and the table, its pause flags and the export dir are exactly as before."""
    from buffer.client import ReplayTable, Trajectory, connect
    from buffer.schema import TableConfig

    table = ReplayTable(connect(redis_url), TableConfig(max_size=100))
    table.insert([Trajectory(prompt_id=f"p{i}", group_id="g", prompt_token_ids=[1], response_token_ids=[2, 3],
                             behaviour_logprobs=[-0.1, -0.2], reward=1.0, grade_status="correct",
                             policy_version=0) for i in range(5)])
    before = table.stats().model_dump()
    api = schemathesis.openapi.from_url(f"{buffer.url}/openapi.json")
    ops = [r.ok() for r in api.get_all_operations() if r.ok().method.upper() == "POST"]
    assert len(ops) == 4
    codes: list[int] = []
    for op in ops:

        @given(case=op.as_strategy())
        @hsettings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
            for auth in ({}, {"Authorization": "Bearer not-the-token"}):
                resp = case.call(headers=auth, timeout=30)
                codes.append(resp.status_code)
                # 422 is fine only for bodies FastAPI cannot parse as JSON at all; valid ones must be 401
                assert resp.status_code in (401, 422), (case.path, resp.status_code, resp.text[:200])

        check()
    assert codes.count(401) >= len(codes) // 2
    after = table.stats().model_dump()
    for d in (before, after):
        d.pop("extra", None)
    assert after == before and table.stats().extra["paused"] == []
    assert list(buffer.export_dir.iterdir()) == []  # no export was written


# ---------------------------------------------------------------- 413


def test_every_post_route_answers_413(reward, buffer, learner) -> None:
    checked = []
    for name, srv in (("reward", reward), ("buffer", buffer), ("learner", learner)):
        for method, path in sorted(mutating_routes(srv.app)):
            assert method == "POST", (name, method, path)  # a PUT/PATCH/DELETE would need its own check here
            assert_413(srv.url, path, BODY_LIMIT, {**JSON, **AUTH})
            checked.append((name, path))
    assert ("reward", "/v1/grade") in checked and ("buffer", "/v1/admin/export") in checked
    # still serving, and a small valid request still works
    r = httpx.post(f"{reward.url}/v1/grade", json={"items": [{"response": r"\boxed{4}", "gold": "4"}]}, timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "correct"
    r = httpx.post(f"{buffer.url}/v1/admin/resume", json={"what": "sampling"}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{learner.url}/health", timeout=10).json()["status"] == "ok"


def test_bodies_just_under_the_limit_are_not_refused(reward, buffer) -> None:
    """The limit is the limit, not less: a valid body of close to BODY_LIMIT bytes is served."""
    pad = "x" * (BODY_LIMIT - 200)
    r = httpx.post(f"{reward.url}/v1/grade", json={"items": [{"response": pad + r" \boxed{4}", "gold": "4"}]},
                   timeout=30)
    assert r.status_code == 200, r.text
    body = b'{"what": "sampling"' + b" " * (BODY_LIMIT - 100) + b"}"
    r = httpx.post(f"{buffer.url}/v1/admin/resume", content=body, headers={**JSON, **AUTH}, timeout=30)
    assert r.status_code == 200, r.text
