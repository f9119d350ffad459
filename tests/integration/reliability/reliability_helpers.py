"""Helpers of the reliability tests (issue 9): uvicorn in a thread, route enumeration, and the two checks every
service must pass: mutating routes refuse unauthenticated callers (401), request bodies are bounded (413).

The checks are generic on purpose: they enumerate the routes of an app built by its `create_app(settings)`, so a
route added later without auth or without a body limit fails them.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

READ_ONLY_COMPUTE: dict[str, frozenset[tuple[str, str]]] = {
    # Documented POST routes that compute an answer and change no state, so they need no token (docs/operations.md,
    # README "Reliability"): grading (reward) and read-only generation on the current weights (actor).
    "reward": frozenset({("POST", "/v1/grade")}),
    "buffer": frozenset(),
    "learner": frozenset(),
    "actor": frozenset({("POST", "/v1/generate")}),
}

BAD_AUTH: list[dict[str, str]] = [
    {},  # no Authorization header
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving an ASGI app (lifespan included) in a daemon thread on a free loopback port."""

    def __init__(self, app: Any, startup_timeout_s: float = 120.0) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every API route, including any hidden from the OpenAPI document."""
    out: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, APIRoute):
            out |= {(m, route.path) for m in route.methods}
    return out


def openapi_routes(app: FastAPI) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in app.openapi()["paths"].items() for m in item
            if m.upper() in MUTATING | {"GET", "HEAD", "OPTIONS"}}


def mutating_routes(app: FastAPI) -> set[tuple[str, str]]:
    return {(m, p) for m, p in app_routes(app) if m in MUTATING}


def assert_refused_401(url: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
    """Every bad Authorization variant gets 401 with a message that names the token."""
    for auth in BAD_AUTH:
        r = httpx.request(method, url + path, content=body, headers={**headers, **auth}, timeout=30.0)
        assert r.status_code == 401, (method, path, auth, r.status_code, r.text[:300])
        detail = str(r.json().get("detail", "")).lower()
        assert "token" in detail, (method, path, detail)


def oversized_chunks(total: int, chunk: int = 64 * 1024) -> Callable[[], Iterator[bytes]]:
    """A generator factory for a body sent chunked (no Content-Length) that ends up `total` bytes long."""

    def gen() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            sent += n
            yield b"a" * n

    return gen


def assert_413(url: str, path: str, limit: int, headers: dict[str, str]) -> None:
    """Over `limit` bytes: 413 with a Content-Length, and 413 when streamed chunked without one."""
    r = httpx.post(url + path, content=b"a" * (limit + 1), headers=headers, timeout=60.0)
    assert r.status_code == 413, ("content-length", path, r.status_code, r.text[:300])
    chunked = oversized_chunks(limit + 64 * 1024)
    r = httpx.post(url + path, content=chunked(), headers=headers, timeout=60.0)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413, ("chunked", path, r.status_code, r.text[:300])
