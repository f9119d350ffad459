"""The buffer API service: inspect the replay table, prompt queue, actors, weights and learner over REST.

    python -m buffer --port 8002          # OpenAPI at /docs, Prometheus at /metrics

Read endpoints are open; /v1/admin/* need `Authorization: Bearer $TBRM_AUTH_TOKEN`. The table config comes from
settings (`[buffer.table]` of the run TOML), the same TableConfig the actors and the learner open the table with.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest

from buffer.api_models import (
    NAME_PATTERN,
    ActorsResponse,
    AdminResponse,
    ClaimsResponse,
    ClaimView,
    ExportJob,
    ExportJobsResponse,
    ExportRequest,
    Health,
    ItemId,
    JobId,
    LearnerResponse,
    LeasesResponse,
    LeaseView,
    PauseRequest,
    PromptsResponse,
    ResetRequest,
    TableName,
    TableStatsResponse,
    TrajectoryDetail,
    TrajectoryPage,
    WeightsResponse,
)
from buffer.client import LearnerStatusStore, TableConfigMismatch, WeightsStore
from buffer.codec import TrajectoryDecodeError
from buffer.service import BufferService
from buffer.settings import BufferSettings
from common.body_limit import BodyLimit

log = logging.getLogger(__name__)

QueueName = Annotated[str | None, Query(pattern=NAME_PATTERN)]


def create_app(settings: BufferSettings | None = None) -> FastAPI:
    svc = BufferService(settings or BufferSettings())
    app = FastAPI(title="tbrm buffer API", version="1", description=__doc__)
    app.add_middleware(BodyLimit, limit=svc.settings.max_body_bytes)
    _add_error_handlers(app)

    @app.get("/health", response_model=Health)
    def health() -> Any:
        ok = svc.redis_ok()
        body = Health(status="ok" if ok else "degraded", redis=ok)
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    registry = CollectorRegistry()  # one per app; values read from Redis at scrape time
    registry.register(svc)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    v1 = _read_routes(svc)
    v1.include_router(_admin_routes(svc))
    app.include_router(v1)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Redis down -> 503; a table config that disagrees or an undecodable stored item -> 409."""

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error on %s: %s", request.url.path, exc)
        return JSONResponse({"detail": f"redis unavailable: {exc}"}, status_code=503)

    async def _conflict(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    app.add_exception_handler(TableConfigMismatch, _conflict)
    app.add_exception_handler(TrajectoryDecodeError, _conflict)


def _read_routes(svc: BufferService) -> APIRouter:
    """The open read endpoints under /v1."""
    v1 = APIRouter(prefix="/v1")

    @v1.get("/config", response_model=BufferSettings.config_view())
    def config() -> dict[str, Any]:
        d = svc.settings.model_dump(mode="json")
        d["auth_token"] = "***" if svc.settings.auth_token else None
        return d

    @v1.get("/tables/{name}/stats", response_model=TableStatsResponse)
    def table_stats(name: TableName) -> TableStatsResponse:
        return svc.table_stats(name)

    @v1.get("/tables/{name}/trajectories", response_model=TrajectoryPage)
    def trajectories(
        name: TableName,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        min_version: Annotated[int | None, Query(ge=0)] = None,
        max_version: Annotated[int | None, Query(ge=0)] = None,
        min_reward: Annotated[float | None, Query(allow_inf_nan=False)] = None,
        max_reward: Annotated[float | None, Query(allow_inf_nan=False)] = None,
        actor_id: Annotated[str | None, Query(max_length=200)] = None,
        leased: bool | None = None,
        min_times_sampled: Annotated[int | None, Query(ge=0)] = None,
        cursor: Annotated[int | None, Query(ge=0, le=2**53)] = None,
    ) -> TrajectoryPage:
        """Offset mode counts every match (O(table size)); cursor mode (`cursor=0`, then `next_cursor`)
        examines a bounded number of items per call, in insertion order."""
        return svc.trajectory_page(name, offset, limit, cursor, min_version=min_version, max_version=max_version,
                                   min_reward=min_reward, max_reward=max_reward, actor_id=actor_id, leased=leased,
                                   min_times_sampled=min_times_sampled)  # fmt: skip

    @v1.get("/tables/{name}/trajectories/{item_id}", response_model=TrajectoryDetail)
    def trajectory(name: TableName, item_id: ItemId) -> TrajectoryDetail:
        return svc.trajectory(name, item_id)

    @v1.get("/tables/{name}/leases", response_model=LeasesResponse)
    def leases(name: TableName, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> LeasesResponse:
        """Leases out now, expiring first (id, expiry, items drawn, items still held)."""
        return LeasesResponse(leases=[LeaseView(**x) for x in svc.table(name).leases(limit)])

    @v1.get("/prompts/claims", response_model=ClaimsResponse)
    def prompt_claims(name: QueueName = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ClaimsResponse:
        """Prompt claims held by actors, expiring first."""
        return ClaimsResponse(claims=[ClaimView(**x) for x in svc.prompt_queue(name).claims(limit)])

    @v1.get("/actors", response_model=ActorsResponse)
    def actors() -> ActorsResponse:
        return svc.actors()

    @v1.get("/weights", response_model=WeightsResponse)
    def weights() -> WeightsResponse:
        return WeightsResponse(latest=WeightsStore(svc.r).latest())

    @v1.get("/learner", response_model=LearnerResponse)
    def learner() -> LearnerResponse:
        return LearnerResponse(status=LearnerStatusStore(svc.r).get())

    @v1.get("/prompts", response_model=PromptsResponse)
    def prompts(name: QueueName = None) -> PromptsResponse:
        return PromptsResponse(**svc.prompt_queue(name).info())

    return v1


def _admin_routes(svc: BufferService) -> APIRouter:
    """/v1/admin/*: bearer token required (401 without one, or when the service has none configured)."""
    token = svc.settings.auth_token

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            raise HTTPException(401, "admin endpoints are disabled: set TBRM_AUTH_TOKEN on the buffer service")
        want = f"Bearer {token.get_secret_value()}"
        if authorization is None or not hmac.compare_digest(authorization.encode(), want.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer $TBRM_AUTH_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    @admin.post("/pause", response_model=AdminResponse)
    def pause(req: PauseRequest) -> AdminResponse:
        return svc.set_paused(req, True)

    @admin.post("/resume", response_model=AdminResponse)
    def resume(req: PauseRequest) -> AdminResponse:
        return svc.set_paused(req, False)

    @admin.post("/reset", response_model=AdminResponse)
    def reset(req: ResetRequest) -> AdminResponse:
        return svc.reset(req)

    @admin.post("/export", response_model=ExportJob, status_code=202)
    def export(req: ExportRequest) -> ExportJob:
        return svc.export(req)

    @admin.get("/exports", response_model=ExportJobsResponse)
    def exports() -> ExportJobsResponse:
        return svc.export_jobs()

    @admin.get("/exports/{job_id}", response_model=ExportJob)
    def export_job(job_id: JobId) -> ExportJob:
        return svc.export_job(job_id)

    return admin
