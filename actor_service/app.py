"""FastAPI app of the actor: health, metrics, status, config, read-only generation and the weight push endpoint.

`create_app(settings, engine=None)`: with no engine, the vLLM engine is built at startup (and closed at shutdown);
tests pass a ready engine so that one vLLM start serves many apps. With `settings.run_loop` the sampling loop
(actor_service.loop) runs in a background thread from startup to shutdown; shutdown (SIGTERM under uvicorn) stops
it gracefully: no new prompts, the batch in flight is finished or given back, the actor deregisters.

`POST /v1/weights` (docs/weight-protocol.md, header names in actor_service.schema). Checks, in this order, each refusal
leaving the running weights untouched:
  401 bearer token missing/wrong (or none configured) -> 400 bad version/sha256 headers -> 409 version not newer
  (checked before the body is read, and again on the engine thread) -> 413 Content-Length or streamed size over
  `max_weight_bytes` -> 400 body shorter than Content-Length -> 400 sha256 mismatch -> 400 not a safetensors file /
  truncated -> 400 first tensor whose name, shape or dtype does not match the model -> apply (reload_weights from
  memory, actor_service.engine) -> score the canary. A 401 is answered without reading the body; other early
  refusals read and discard a body up to DRAIN_LIMIT_BYTES so the client sees the status. The body is received
  into memory and hashed on another thread while it arrives (actor_service.receive); nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from actor_service.metrics import ActorMetrics
from actor_service.receive import BodyRefused, receive_body
from actor_service.schema import (
    SHA256_HEADER,
    VERSION_HEADER,
    ActorHealth,
    ActorStatus,
    GeneratedSample,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    WeightUpdateResponse,
    canary_token_ids,
)
from actor_service.settings import ActorSettings
from actor_service.weights import WeightsFormatError, WeightsMismatchError, parse_weights
from common.body_limit import BodyLimit

if TYPE_CHECKING:
    from actor_service.engine import ActorEngine
    from actor_service.loop import ActorLoop

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
DRAIN_LIMIT_BYTES = 256 * 2**20
"""On an early refusal, read and discard a declared body up to this size so the client gets the status code
instead of a broken pipe; larger bodies are cut off (the connection closes)."""


class _Refusal(HTTPException):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.reason = reason


class ActorState:
    """What the routes share: settings, engine (set at startup), metrics, the loop, and the push lock."""

    def __init__(self, settings: ActorSettings, metrics: ActorMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: ActorEngine | None = None
        self.loop: ActorLoop | None = None
        self.push_lock = asyncio.Lock()

    def require_engine(self) -> ActorEngine:
        if self.engine is None:
            raise HTTPException(status_code=503, detail="engine is starting")
        return self.engine


def _check_token(settings: ActorSettings, authorization: str | None) -> None:
    if not settings.auth_token:
        raise _Refusal(401, "auth", "weight pushes are disabled on this actor: set TBRM_AUTH_TOKEN")
    if not authorization or not authorization.startswith("Bearer "):
        raise _Refusal(401, "auth", "missing bearer token: send 'Authorization: Bearer <TBRM_AUTH_TOKEN>'")
    if not hmac.compare_digest(authorization[7:].strip().encode(), settings.auth_token.encode()):
        raise _Refusal(401, "auth", "wrong bearer token")


def _parse_version(raw: str | None) -> int:
    if raw is None:
        raise _Refusal(400, "headers", f"missing {VERSION_HEADER} header (the new policy version, an integer)")
    try:
        version = int(raw)
    except ValueError:
        raise _Refusal(400, "headers", f"{VERSION_HEADER} must be an integer, got {raw[:40]!r}") from None
    if version < 0:
        raise _Refusal(400, "headers", f"{VERSION_HEADER} must be >= 0, got {version}")
    return version


async def _drain(request: Request, content_length: int | None) -> None:
    if content_length is None or content_length > DRAIN_LIMIT_BYTES:
        return
    with suppress(ClientDisconnect):
        async for _ in request.stream():
            pass


def create_app(settings: ActorSettings | None = None, engine: ActorEngine | None = None) -> FastAPI:
    settings = settings or ActorSettings()
    metrics = ActorMetrics()
    state = ActorState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_engine = engine is None
        if engine is None:
            from actor_service.engine import engine_from_settings

            state.engine = await run_in_threadpool(engine_from_settings, settings)
        else:
            state.engine = engine
        metrics.weight_version.set(state.engine.version)
        if settings.canary:
            # the first prompt-log-prob request of a fresh engine sets up its kernels (measured: tens of seconds on
            # a loaded CPU): pay it in the background at start, not inside the first push
            threading.Thread(target=_warm_canary, args=(state.engine,), name="canary-warmup", daemon=True).start()
        if settings.run_loop:
            from actor_service.loop import ActorLoop

            state.loop = ActorLoop(settings, state.engine, metrics)
            state.loop.start()
        else:
            metrics.state = "serving"
        try:
            yield
        finally:
            if state.loop is not None:
                await run_in_threadpool(state.loop.stop)
            if own_engine:
                state.engine.close()

    app = FastAPI(
        title="tbrm actor",
        version="1",
        description="vLLM sampling service: prompts -> vLLM -> reward -> replay buffer; receives weights over HTTP.",
        lifespan=lifespan,
    )
    app.state.actor = state
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, exempt_paths={"/v1/weights"},
                       detail=f"request body over max_request_bytes={settings.max_request_bytes}")
    router = APIRouter(prefix="/v1")

    @app.get("/health", response_model=ActorHealth)
    def health() -> ActorHealth:
        eng = state.engine
        return ActorHealth(status="ok" if eng is not None else "starting", actor_id=settings.actor_id,
                           policy_version=eng.version if eng is not None else None, state=metrics.state)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> Response:
        metrics.rates()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/status", response_model=ActorStatus)
    def status() -> ActorStatus:
        eng = state.require_engine()
        tok_s, traj_s = metrics.rates()
        return ActorStatus(
            actor_id=settings.actor_id,
            policy_version=eng.version,
            model=str(eng.model_dir),
            state=metrics.state,
            trajectories=metrics.total_trajectories,
            tokens_generated=metrics.total_tokens,
            tokens_per_s=tok_s,
            trajectories_per_s=traj_s,
            last_batch_s=metrics.last_batch_s,
            last_update_s=metrics.last_update_s,
            weight_updates=metrics.total_updates,
            pushes_refused=metrics.total_refused,
            prompts_in_flight=metrics.prompts_in_flight,
            loop_enabled=settings.run_loop,
            last_error=metrics.last_error,
        )

    @router.get("/config", response_model=ActorSettings.config_view())
    def config() -> dict[str, Any]:
        return settings.redacted()

    @router.post("/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        eng = state.require_engine()
        if req.max_tokens > settings.generate_max_tokens:
            raise HTTPException(status_code=422, detail=f"max_tokens={req.max_tokens} exceeds this actor's "
                                                        f"generate_max_tokens={settings.generate_max_tokens}")
        if len(req.prompts) * req.n > settings.generate_max_samples:
            raise HTTPException(status_code=422, detail=f"{len(req.prompts)} prompts x n={req.n} exceeds this "
                                                        f"actor's generate_max_samples={settings.generate_max_samples}")

        def run() -> GenerateResponse:
            if req.chat:
                ids = [eng.chat_token_ids([{"role": "user", "content": p}], settings.system_prompt)
                       for p in req.prompts]
            else:
                ids = [eng.text_token_ids(p) for p in req.prompts]
            for i, p in enumerate(ids):
                if not p:
                    raise HTTPException(status_code=422, detail=f"prompt {i} is empty after tokenization")
                if not eng.fits(p):
                    raise HTTPException(
                        status_code=422,
                        detail=f"prompt {i} has {len(p)} tokens; max_model_len is {eng.max_model_len}",
                    )
            gen = eng.generate(ids, n=req.n, temperature=req.temperature, top_p=req.top_p,
                               max_tokens=req.max_tokens, seed=req.seed)
            results = [
                GenerateResult(
                    prompt_token_ids=p,
                    samples=[
                        GeneratedSample(text=s.text, token_ids=s.token_ids, finish_reason=s.finish_reason,
                                        logprobs=s.logprobs if req.logprobs else None)
                        for s in group
                    ],
                )
                for p, group in zip(ids, gen.samples, strict=True)
            ]
            return GenerateResponse(policy_version=gen.version_start, results=results, latency_s=gen.latency_s)

        return await run_in_threadpool(run)

    @router.post(
        "/weights",
        response_model=WeightUpdateResponse,
        responses={
            400: {"description": "bad headers, checksum, format, or tensors that do not fit the model"},
            401: {"description": "missing or wrong bearer token"},
            409: {"description": "version not newer than the actor's"},
            413: {"description": "body larger than max_weight_bytes"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def push_weights(
        request: Request,
        authorization: str | None = Header(default=None),
        policy_version: str | None = Header(default=None, alias=VERSION_HEADER),
        sha256: str | None = Header(default=None, alias=SHA256_HEADER),
        content_length: str | None = Header(default=None),
    ) -> WeightUpdateResponse:
        declared: int | None = None
        if content_length is not None and content_length.isdigit():
            declared = int(content_length)
        try:
            return await _push(request, authorization, policy_version, sha256, declared)
        except (_Refusal, BodyRefused) as refusal:
            metrics.record_refused(refusal.reason)
            log.warning("weight push refused (%d): %s", refusal.status_code, refusal.detail)
            raise

    async def _push(
        request: Request, authorization: str | None, raw_version: str | None, sha256: str | None,
        declared: int | None,
    ) -> WeightUpdateResponse:
        eng = state.require_engine()
        # No token, no reading: an unauthenticated client gets its 401 and the connection closes (nothing of the
        # body is read, so it cannot make the actor spend time or memory).
        _check_token(settings, authorization)
        try:
            version = _parse_version(raw_version)
            if sha256 is None or not _SHA256_RE.match(sha256):
                raise _Refusal(400, "headers", f"{SHA256_HEADER} must be the 64-hex-digit sha256 of the body")
            if version <= eng.version:
                raise _Refusal(409, "version", f"policy version {version} is not newer than the actor's "
                                               f"current version {eng.version}")
            if declared is not None and declared > settings.max_weight_bytes:
                raise _Refusal(413, "too_large", f"body of {declared} bytes exceeds max_weight_bytes="
                                                 f"{settings.max_weight_bytes}")
        except _Refusal:
            await _drain(request, declared)
            raise
        async with state.push_lock:
            t0 = time.perf_counter()
            body, digest = await receive_body(request, declared, settings.max_weight_bytes)
            if not hmac.compare_digest(digest, sha256.lower()):
                raise _Refusal(400, "checksum", f"sha256 mismatch: body hashes to {digest}, header says "
                                                f"{sha256.lower()}")
            tensors = await run_in_threadpool(_parse, eng, body)
            receive_s = time.perf_counter() - t0
            load_s = await run_in_threadpool(_apply, eng, tensors, version)
            t1 = time.perf_counter()
            canary = await run_in_threadpool(_canary, eng)
            canary_s = time.perf_counter() - t1
        metrics.record_update(version, load_s, receive_s, len(body))
        return WeightUpdateResponse(
            policy_version=version, sha256=digest, nbytes=len(body), receive_s=receive_s, load_s=load_s,
            canary_s=canary_s, canary_logprobs=canary,
        )

    def _parse(eng: ActorEngine, body: bytes | bytearray) -> dict[str, Any]:
        try:
            return parse_weights(body, eng.spec, eng.optional, settings.max_header_bytes)
        except WeightsFormatError as e:
            raise _Refusal(400, "format", str(e)) from None
        except WeightsMismatchError as e:
            raise _Refusal(400, "mismatch", str(e)) from None

    def _apply(eng: ActorEngine, tensors: dict[str, Any], version: int) -> float:
        from actor_service.engine import VersionConflict, WeightsApplyError

        try:
            return eng.apply_weights(tensors, version)
        except VersionConflict as e:
            raise _Refusal(409, "version", str(e)) from None
        except WeightsApplyError as e:
            raise _Refusal(400, "apply_failed", str(e)) from None

    def _warm_canary(eng: ActorEngine) -> None:
        try:
            _canary(eng)
        except Exception as e:  # noqa: BLE001  (e.g. the engine closed first: only a warm-up)
            log.debug("canary warm-up skipped: %s", e)

    def _canary(eng: ActorEngine) -> list[float] | None:
        if not settings.canary:
            return None
        return eng.score(canary_token_ids(eng.spec["model.embed_tokens.weight"].shape[0]))

    app.include_router(router)
    return app
