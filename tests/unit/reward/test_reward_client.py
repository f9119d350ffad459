"""RewardClient against real HTTP servers (uvicorn in a thread) that fail in controlled ways."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from reward.client import RewardClient, RewardServiceError
from reward.schema import GradeItem, GradeRequest


class FlakyServer:
    """Answers /v1/grade with `fail_first` 503s (or 400s), then echoes `correct` for each item."""

    def __init__(self, port: int, fail_first: int = 0, fail_code: int = 503, delay_s: float = 0.0) -> None:
        self.calls = 0
        app = FastAPI()

        @app.post("/v1/grade")
        async def grade(request: Request) -> JSONResponse:
            self.calls += 1
            if delay_s:
                await asyncio.sleep(delay_s)
            if self.calls <= fail_first:
                return JSONResponse({"detail": "nope"}, status_code=fail_code)
            req = GradeRequest.model_validate_json(await request.body())
            return JSONResponse({"results": [{"score": 1.0, "status": "correct", "extracted": it.gold}
                                             for it in req.items]})

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def flaky(port: int, request: pytest.FixtureRequest) -> Iterator[FlakyServer]:
    server = FlakyServer(port, **getattr(request, "param", {}))
    yield server
    server.stop()


ITEMS = [GradeItem(response=r"\boxed{1}", gold="1"), GradeItem(response=r"\boxed{2}", gold="2")]


@pytest.mark.parametrize("flaky", [{"fail_first": 2}], indirect=True)
def test_retries_5xx_then_succeeds(flaky: FlakyServer) -> None:
    with RewardClient(flaky.url, timeout_s=5.0, retries=3, backoff_s=0.01) as client:
        results = client.grade(ITEMS)
    assert [r.extracted for r in results] == ["1", "2"] and flaky.calls == 3


@pytest.mark.parametrize("flaky", [{"fail_first": 10}], indirect=True)
def test_gives_up_after_retries(flaky: FlakyServer) -> None:
    with RewardClient(flaky.url, timeout_s=5.0, retries=2, backoff_s=0.01) as client:
        with pytest.raises(RewardServiceError, match="after 3 attempts") as err:
            client.grade(ITEMS)
    assert err.value.status_code == 503 and flaky.calls == 3


@pytest.mark.parametrize("flaky", [{"fail_first": 10, "fail_code": 400}], indirect=True)
def test_no_retry_on_4xx(flaky: FlakyServer) -> None:
    with RewardClient(flaky.url, timeout_s=5.0, retries=3, backoff_s=0.01) as client:
        with pytest.raises(RewardServiceError) as err:
            client.grade(ITEMS)
    assert err.value.status_code == 400 and flaky.calls == 1


@pytest.mark.parametrize("flaky", [{"fail_first": 1}], indirect=True)
def test_async_retries_and_splits_batches(flaky: FlakyServer) -> None:
    items = [GradeItem(response="x", gold=str(i)) for i in range(10)]

    async def main() -> list:
        async with RewardClient(flaky.url, timeout_s=5.0, retries=2, backoff_s=0.01, batch_size=4) as client:
            return await client.agrade(items)

    results = asyncio.run(main())
    assert [r.extracted for r in results] == [str(i) for i in range(10)]
    assert flaky.calls == 4  # 3 chunks + 1 retried 503


@pytest.mark.parametrize("flaky", [{"delay_s": 2.0}], indirect=True)
def test_read_timeout_is_a_retried_transport_error(flaky: FlakyServer) -> None:
    with RewardClient(flaky.url, timeout_s=0.3, retries=1, backoff_s=0.01) as client:
        t0 = time.monotonic()
        with pytest.raises(RewardServiceError, match="Timeout"):
            client.grade(ITEMS)
        assert time.monotonic() - t0 < 1.5 and flaky.calls == 2


def test_connection_refused_retries_and_health_false(port: int) -> None:
    client = RewardClient(f"http://127.0.0.1:{port}", timeout_s=1.0, retries=2, backoff_s=0.01)
    assert client.health(timeout_s=0.5) is False
    with pytest.raises(RewardServiceError, match="ConnectError"):
        client.grade(ITEMS)
    with pytest.raises(TimeoutError):
        client.wait_ready(timeout_s=0.3)
    client.close()


def test_client_validates_arguments() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RewardClient("http://x", timeout_s=0)
    with pytest.raises(ValueError, match="retries"):
        RewardClient("http://x", retries=-1)
    with pytest.raises(ValueError, match="batch_size"):
        RewardClient("http://x", batch_size=5000)


def test_default_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TBRM_REWARD_URL", "http://reward.example:9")
    assert RewardClient().base_url == "http://reward.example:9"


def test_long_responses_are_sent_as_their_tail_in_bounded_requests() -> None:
    from reward.client import MAX_REQUEST_BYTES
    from reward.schema import MAX_RESPONSE_CHARS

    client = RewardClient("http://127.0.0.1:1", batch_size=256)
    long_item = GradeItem(response="x" * 3 * MAX_RESPONSE_CHARS + "\\boxed{5}", gold="5")
    chunks = client._chunks([long_item] * 100 + [GradeItem(response="\\boxed{1}", gold="1")] * 300)
    flat = [it for c in chunks for it in c]
    assert len(flat) == 400 and flat[0].response.endswith("\\boxed{5}")
    assert all(len(it.response) <= MAX_RESPONSE_CHARS for it in flat)
    assert all(len(c) <= 256 and len(client._body(c)) <= MAX_REQUEST_BYTES for c in chunks)
