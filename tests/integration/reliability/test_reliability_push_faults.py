"""Weight pushes to dead and slow actors (issue 9): each push times out within the configured timeout, the
learner's pusher never waits on it (other actors get their weights at once), and a failed actor that comes back is
caught up with the newest version on a later sync.

The faulty actors are real sockets on loopback: a closed port (dead process), a server that accepts and reads the
body but never answers (hung handler), and a listener that never accepts (a frozen process: the kernel completes
the handshake and buffers bytes until the window fills, then the sender stalls). The good actor is a real uvicorn
server that checks the token, version and sha256 like an actor does.
(tests/unit/learner_units/test_learner_units.py::test_pusher_never_blocks_and_catches_up covers a handler that
sleeps and the 409 "already has it" path; the learner's training loop with a dead actor registered is
tests/integration/learner/test_learner_loop.py::test_loop_trains_acks_caches_reference_exports_and_pushes.)
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException, Request
from reliability_helpers import ServerThread, free_port

from actor_service.client import WeightPushError, push_weights
from actor_service.schema import SHA256_HEADER, VERSION_HEADER
from buffer.schema import ActorInfo, WeightsInfo

TOKEN = "push-faults-token"
TIMEOUT_S = 1.0
MARGIN_S = 1.5  # scheduling slack on a loaded 2-core box


class StallingServer:
    """Accepts connections and reads (or, with `accept=False`, never accepts); never answers."""

    def __init__(self, accept: bool = True, port: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port or 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stop_event = threading.Event()
        self.conns: list[socket.socket] = []
        self.bytes_read = 0
        self.thread: threading.Thread | None = None
        if accept:
            self.thread = threading.Thread(target=self._serve, daemon=True)
            self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop_event.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.1)
            self.conns.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        while not self.stop_event.is_set():
            try:
                data = conn.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.bytes_read += len(data)

    def stop(self) -> None:
        self.stop_event.set()
        for c in self.conns:
            c.close()
        self.sock.close()
        if self.thread is not None:
            self.thread.join(5)


class GoodActor:
    """A real HTTP `POST /v1/weights` that verifies token, version and sha256, and records what it applied."""

    def __init__(self, port: int | None = None) -> None:
        self.versions: list[int] = []
        app = FastAPI()

        @app.post("/v1/weights")
        async def weights(request: Request) -> dict[str, Any]:
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                raise HTTPException(401, "wrong bearer token")
            version = int(request.headers[VERSION_HEADER])
            if self.versions and version <= self.versions[-1]:
                raise HTTPException(409, "not newer")
            body = await request.body()
            digest = hashlib.sha256(body).hexdigest()
            if digest != request.headers[SHA256_HEADER]:
                raise HTTPException(400, "sha256 mismatch")
            self.versions.append(version)
            return {"policy_version": version, "sha256": digest, "nbytes": len(body), "receive_s": 0.0,
                    "load_s": 0.0}

        self.server = ServerThread(app) if port is None else _server_on(app, port)
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop()


def _server_on(app: Any, port: int) -> ServerThread:
    import uvicorn

    srv = ServerThread.__new__(ServerThread)
    srv.port = port
    srv.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               access_log=False))
    srv.thread = threading.Thread(target=srv.server.run, daemon=True)
    srv.thread.start()
    deadline = time.monotonic() + 30
    while not srv.server.started:
        assert srv.thread.is_alive() and time.monotonic() < deadline, f"uvicorn did not start on {port}"
        time.sleep(0.02)
    return srv


@pytest.fixture
def weights_file(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "policy-v00000001.safetensors"
    save_file({"w": torch.arange(1024, dtype=torch.float32)}, str(path))
    yield path, hashlib.sha256(path.read_bytes()).hexdigest()


def _timed_push(url: str, path: Path, version: int = 1) -> tuple[float, WeightPushError]:
    t0 = time.monotonic()
    with pytest.raises(WeightPushError) as err:
        push_weights(url, path, version=version, token=TOKEN, timeout_s=TIMEOUT_S)
    return time.monotonic() - t0, err.value


def test_push_to_a_dead_actor_fails_fast(weights_file) -> None:
    elapsed, err = _timed_push(f"http://127.0.0.1:{free_port()}", weights_file[0])
    assert err.status is None and "failed" in err.message
    assert elapsed < TIMEOUT_S + MARGIN_S


def test_push_to_a_hung_actor_times_out(weights_file) -> None:
    hung = StallingServer(accept=True)
    try:
        elapsed, err = _timed_push(hung.url, weights_file[0])
        assert err.status is None and "timed out" in err.message, err
        assert TIMEOUT_S - 0.05 <= elapsed < TIMEOUT_S + MARGIN_S, elapsed
        assert hung.bytes_read > 0  # it did connect and send: the read of the answer is what timed out
    finally:
        hung.stop()


def test_push_to_a_frozen_actor_times_out(tmp_path: Path) -> None:
    """A frozen actor's kernel still accepts the connection; a body larger than the socket buffers stalls the
    sender, and the write timeout ends the push."""
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (48 * 2**20))
    frozen = StallingServer(accept=False)
    try:
        elapsed, err = _timed_push(frozen.url, big)
        assert err.status is None and "timed out" in err.message, err
        assert elapsed < TIMEOUT_S + MARGIN_S + 1.0, elapsed
    finally:
        frozen.stop()


def test_pusher_goes_on_and_catches_failed_actors_up(weights_file) -> None:
    from learner.push import WeightPusher

    path, digest = weights_file
    dead_port = free_port()
    hung = StallingServer(accept=True)
    good = GoodActor()
    actors = [
        ActorInfo(actor_id="dead", url=f"http://127.0.0.1:{dead_port}", started_at=1.0),
        ActorInfo(actor_id="hung", url=hung.url, started_at=1.0),
        ActorInfo(actor_id="good", url=good.url, started_at=1.0),
    ]
    revived: list[GoodActor] = []
    pusher = WeightPusher(lambda: list(actors), token=TOKEN, timeout_s=TIMEOUT_S, retry_s=0.5)
    try:
        v1 = WeightsInfo(version=1, sha256=digest, nbytes=path.stat().st_size, path=str(path))
        t0 = time.monotonic()
        assert pusher.sync(v1) == 3
        assert time.monotonic() - t0 < 0.5  # sync never waits on a push
        deadline = time.monotonic() + TIMEOUT_S
        while good.versions != [1] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert good.versions == [1]  # served before the hung push even timed out
        assert pusher.wait_idle(TIMEOUT_S + MARGIN_S)
        assert pusher.delivered() == {"dead": -1, "hung": -1, "good": 1}
        assert pusher.stats.pushes_failed == 2 and pusher.stats.pushes_ok == 1
        assert pusher.sync(v1) <= 2  # the good one is up to date: only failed ones are retried (after retry_s)
        assert pusher.wait_idle(TIMEOUT_S + MARGIN_S)

        # both failed actors come back (same addresses), and a newer version exists meanwhile
        hung_port = hung.port
        hung.stop()
        revived += [GoodActor(port=dead_port), GoodActor(port=hung_port)]
        time.sleep(0.6)
        v2 = WeightsInfo(version=2, sha256=digest, nbytes=path.stat().st_size, path=str(path))
        assert pusher.sync(v2) == 3
        assert pusher.wait_idle(5.0)
        assert pusher.delivered() == {"dead": 2, "hung": 2, "good": 2}
        assert [a.versions for a in revived] == [[2], [2]]  # caught up straight to the newest version
        assert good.versions == [1, 2]
    finally:
        pusher.close()
        hung.stop()
        good.stop()
        for a in revived:
            a.stop()
