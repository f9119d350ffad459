"""The push body read from the socket into its buffer (actor_service.http_server, BODY_INTO) against uvicorn's own
ASGI body messages: the same bytes and digest, a cut-off body refused with 400, `Expect: 100-continue` honoured.
Real uvicorn servers on loopback serving a small app around `weight_receiver.receive_body` (no vLLM: fast)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from actor_service.app import server_config
from actor_service.body_into import BODY_INTO
from actor_service.weight_receiver import PushRefused, receive_body

LIMIT = 64 * 2**20


def body_app(refusals: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/body")
    async def body(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        try:
            buf, digest = await receive_body(request, int(declared) if declared else None, LIMIT, alloc=bytearray)
        except PushRefused as e:
            refusals.append(f"{e.status_code} {e.detail}")
            raise
        return {"sha256": digest, "nbytes": len(buf), "into": BODY_INTO in request.scope.get("extensions", {})}

    return app


class Server:
    def __init__(self, kind: str) -> None:
        self.refusals: list[str] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = body_app(self.refusals)
        config = (server_config(app, "127.0.0.1", self.port, "warning") if kind == "actor" else
                  uvicorn.Config(app, host="127.0.0.1", port=self.port, http="httptools", log_level="warning"))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def head(self, nbytes: int, extra: str = "") -> bytes:
        return (f"POST /body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {nbytes}\r\n{extra}\r\n").encode()


@pytest.fixture(scope="module", params=["actor", "plain"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    srv = Server(request.param)
    srv.kind = request.param
    yield srv
    srv.server.should_exit = True
    srv.thread.join(30)


def test_body_and_digest_are_those_sent(server: Server) -> None:
    body = os.urandom(3 * 2**20 + 17)
    r = httpx.post(f"http://127.0.0.1:{server.port}/body", content=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"sha256": hashlib.sha256(body).hexdigest(), "nbytes": len(body),
                        "into": server.kind == "actor"}
    # read past the HTTP parser: that connection is not reused
    assert (r.headers.get("connection") == "close") == (server.kind == "actor")


def test_a_body_that_came_with_the_headers_keeps_the_connection(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        for body in (b"first", b"second body"):
            s.sendall(server.head(len(body)) + body)
            answer = _read_answer(s)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert hashlib.sha256(body).hexdigest().encode() in answer
            assert b"connection: close" not in answer.lower()


def test_a_body_cut_off_midway_is_refused(server: Server) -> None:
    body = os.urandom(4 * 2**20)
    before = len(server.refusals)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(server.head(len(body)) + body[: len(body) // 2])
        time.sleep(0.3)  # the server is reading the body
    deadline = time.monotonic() + 10
    while len(server.refusals) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.refusals[before:] == [f"400 client disconnected after {len(body) // 2} bytes of the body"]
    # the server goes on
    r = httpx.post(f"http://127.0.0.1:{server.port}/body", content=body, timeout=30)
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_expect_100_continue_is_answered_before_the_body(server: Server) -> None:
    body = os.urandom(2**20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(server.head(len(body), "Expect: 100-continue\r\n"))
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        answer = _read_answer(s)
    assert answer.startswith(b"HTTP/1.1 200") and hashlib.sha256(body).hexdigest().encode() in answer


def _read_answer(s: socket.socket) -> bytes:
    """One HTTP response with a Content-Length (FastAPI's JSON)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")))
    while len(rest) < length:
        rest += s.recv(65536)
    return head + b"\r\n\r\n" + rest
