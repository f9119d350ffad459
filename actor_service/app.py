"""FastAPI app of the actor: thin routes over `ActorRuntime` (actor_service.runtime) and `WeightReceiver`
(actor_service.weight_receiver, the weight receive path).

`create_app(settings, engine=None)`: with no engine, the vLLM engine is built at startup (and closed at shutdown);
tests pass a ready engine so that one vLLM start serves many apps. With `settings.run_loop` the sampling loop
(actor_service.loop) runs in background threads from startup to shutdown; shutdown (SIGTERM under uvicorn) stops
it gracefully: no new prompts, unfinished prompt claims given back at once, the actor deregisters.
Routes: /health, /metrics, /v1/status, /v1/config, /v1/generate (read-only sampling), POST /v1/weights.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from actor_service.runtime import ActorRuntime
from actor_service.schema import (
    RELAY_HEADER,
    SHA256_HEADER,
    VERSION_HEADER,
    ActorHealth,
    ActorStatus,
    GenerateRequest,
    GenerateResponse,
    WeightUpdateResponse,
)
from actor_service.settings import ActorSettings
from common.body_limit import BodyLimit

if TYPE_CHECKING:
    import uvicorn

    from actor_service.engine import ActorEngine

WEIGHTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad headers, checksum, format, or tensors that do not fit the model"},
    401: {"description": "missing or wrong bearer token"},
    409: {"description": "version not newer than the actor's"},
    411: {"description": "a relayed push (X-TBRM-Relay) without Content-Length"},
    413: {"description": "body larger than max_weight_bytes"},
}
WEIGHTS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def server_config(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for an actor app: the asyncio loop and httptools with the BODY_INTO extension
    (actor_service.http_server: weight pushes read from the socket straight into their buffer), or h11 where
    httptools is not installed (pushes then arrive as ASGI body messages, several times slower). Measured for
    pushes on loopback before BODY_INTO: asyncio + httptools ~1.1 GB/s, uvloop + httptools ~0.4 GB/s, h11 ~0.2 GB/s."""
    import uvicorn

    http: Any = "h11"
    if importlib.util.find_spec("httptools"):
        from actor_service.http_server import BodyIntoProtocol

        http = BodyIntoProtocol
    return uvicorn.Config(app, host=host, port=port, loop="asyncio", http=http, log_level=log_level, access_log=False)


def create_app(settings: ActorSettings | None = None, engine: ActorEngine | None = None) -> FastAPI:
    settings = settings or ActorSettings()
    runtime = ActorRuntime(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="tbrm actor",
        version="1",
        description="vLLM sampling service: prompts -> vLLM -> reward -> replay buffer; receives weights over HTTP.",
        lifespan=lifespan,
    )
    app.state.actor = runtime
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, exempt_paths={"/v1/weights"},
                       detail=f"request body over max_request_bytes={settings.max_request_bytes}")
    router = APIRouter(prefix="/v1")

    @app.get("/health", response_model=ActorHealth)
    def health() -> ActorHealth:
        return runtime.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> Response:
        runtime.metrics.rates()
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/status", response_model=ActorStatus)
    def status() -> ActorStatus:
        return runtime.status()

    @router.get("/config", response_model=ActorSettings.config_view())
    def config() -> dict[str, Any]:
        return settings.redacted()

    @router.post("/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        runtime.require_engine()
        runtime.check_generate(req)
        return await run_in_threadpool(runtime.generate, req)

    @router.post("/weights", response_model=WeightUpdateResponse, responses=WEIGHTS_RESPONSES,
                 openapi_extra=WEIGHTS_BODY)
    async def push_weights(
        request: Request,
        authorization: str | None = Header(default=None),
        policy_version: str | None = Header(default=None, alias=VERSION_HEADER),
        sha256: str | None = Header(default=None, alias=SHA256_HEADER),
        content_length: str | None = Header(default=None),
        relay: str | None = Header(default=None, alias=RELAY_HEADER),
    ) -> WeightUpdateResponse:
        return await runtime.receiver.receive(request, authorization, policy_version, sha256, content_length,
                                              relay)

    app.include_router(router)
    return app
