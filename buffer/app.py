"""The buffer API service: inspect the replay table, prompt queue, actors, weights and learner over REST.

    python -m buffer --port 8002          # OpenAPI at /docs, Prometheus at /metrics

Read endpoints are open; /v1/admin/* need `Authorization: Bearer $TBRM_AUTH_TOKEN`. The table config comes from
settings (`[buffer.table]` of the run TOML), the same TableConfig the actors and the learner open the table with.
"""

from __future__ import annotations

import collections
import hmac
import logging
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from buffer.client import (
    ActorInfo,
    ActorRegistry,
    LearnerStatus,
    LearnerStatusStore,
    PromptQueue,
    ReplayTable,
    TableConfigMismatch,
    TableStats,
    Trajectory,
    WeightsInfo,
    WeightsStore,
    connect,
)
from buffer.codec import TrajectoryDecodeError
from buffer.export import export_parquet
from buffer.settings import BufferSettings
from common.body_limit import BodyLimit

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
TableName = Annotated[str, PathParam(pattern=NAME_PATTERN)]
ItemId = Annotated[str, PathParam(max_length=200)]


# ---- response and request models ----


class Health(BaseModel):
    status: str
    redis: bool


class Rates(BaseModel):
    inserts_per_s: float
    samples_per_s: float
    window_s: float
    """Seconds between the oldest and newest counter snapshot used (0 until two snapshots exist)."""


class TableStatsResponse(BaseModel):
    stats: TableStats
    rates: Rates
    histograms: dict[str, dict[str, float]]
    """policy_version, times_sampled, reward_by_version (mean) and version_lag (vs the learner) -> counts."""


class TrajectorySummary(BaseModel):
    item_id: str
    prompt_id: str
    group_id: str
    policy_version: int
    reward: float
    grade_status: str
    actor_id: str
    response_tokens: int
    finish_reason: str
    times_sampled: int
    times_acked: int
    priority: float
    leased: bool
    inserted_at: float
    has_reference: bool


class TrajectoryPage(BaseModel):
    total: int | None
    """Items matching the filters (offset mode; None in cursor mode, which never counts the whole table)."""
    offset: int
    limit: int
    items: list[TrajectorySummary]
    next_cursor: int | None = None
    """Cursor mode: pass as `cursor` for the next page (None: the end)."""


class TrajectoryDetail(BaseModel):
    summary: TrajectorySummary
    trajectory: Trajectory


class ActorView(BaseModel):
    info: ActorInfo
    live: bool
    seconds_since_heartbeat: float
    version_skew: int | None
    """latest published weights version - the actor's policy_version (None until weights exist)."""


class ActorsResponse(BaseModel):
    latest_weights_version: int | None
    actors: list[ActorView]


class WeightsResponse(BaseModel):
    latest: WeightsInfo | None


class LearnerResponse(BaseModel):
    status: LearnerStatus | None


class PromptsResponse(BaseModel):
    name: str
    loaded: bool
    dataset_size: int
    epoch: int
    epochs: int
    queued: int
    claimed: int
    done: int
    reclaimed: int


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    what: Literal["sampling", "inserts"]
    """Which side to pause/resume."""
    table: str | None = Field(None, pattern=NAME_PATTERN)
    """Table name (default: the configured table)."""


class ResetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table: str | None = Field(None, pattern=NAME_PATTERN)
    drop_config: bool = False
    """Also forget the stored TableConfig (the next user's config is adopted)."""


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    """File name stem inside the server's export_dir (letters, digits, `_.-`; no paths)."""
    table: str | None = Field(None, pattern=NAME_PATTERN)
    overwrite: bool = False


class LeaseView(BaseModel):
    lease_id: str
    expires_at: float
    """Unix seconds (Redis server clock)."""
    items: int
    """Items drawn under this lease."""
    held: int
    """Items the lease still holds (not acked yet)."""


class LeasesResponse(BaseModel):
    leases: list[LeaseView]


class ClaimView(BaseModel):
    consumer: str
    prompt_id: str
    expires_at: float
    copies: int
    """Copies of the prompt claimed (one per epoch)."""


class ClaimsResponse(BaseModel):
    claims: list[ClaimView]


class AdminResponse(BaseModel):
    ok: bool
    detail: str
    paused: list[str] = []


class ExportResponse(BaseModel):
    path: str
    rows: int
    bytes: int


# ---- app ----


class _RateTracker:
    """Counter snapshots per table, for insert/sample rates over a sliding window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.points: dict[str, collections.deque[tuple[float, int, int]]] = {}

    def observe(self, name: str, inserts: int, samples: int) -> Rates:
        now = time.monotonic()
        dq = self.points.setdefault(name, collections.deque())
        dq.append((now, inserts, samples))
        while len(dq) > 2 and now - dq[0][0] > self.window_s:
            dq.popleft()
        t0, i0, s0 = dq[0]
        dt = now - t0
        if dt <= 0 or inserts < i0 or samples < s0:  # reset happened: restart the window
            if inserts < i0 or samples < s0:
                dq.clear()
                dq.append((now, inserts, samples))
            return Rates(inserts_per_s=0.0, samples_per_s=0.0, window_s=0.0)
        return Rates(inserts_per_s=(inserts - i0) / dt, samples_per_s=(samples - s0) / dt, window_s=dt)


def create_app(settings: BufferSettings | None = None) -> FastAPI:
    settings = settings or BufferSettings()
    r = connect(settings.redis_url, timeout_s=settings.redis_timeout_s)
    rates = _RateTracker(settings.rate_window_s)
    tables: dict[str, ReplayTable] = {}

    def table(name: str) -> ReplayTable:
        if name in tables:
            return tables[name]
        if name == settings.table.name:
            t = ReplayTable(r, settings.table)
        elif r.exists(ReplayTable.config_key(name)):
            t = ReplayTable(r, None, name=name)
        else:
            raise HTTPException(404, f"no table {name!r} (configured table: {settings.table.name!r})")
        tables[name] = t
        return t

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if settings.auth_token is None:
            raise HTTPException(401, "admin endpoints are disabled: set TBRM_AUTH_TOKEN on the buffer service")
        want = f"Bearer {settings.auth_token.get_secret_value()}"
        if authorization is None or not hmac.compare_digest(authorization.encode(), want.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer $TBRM_AUTH_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="tbrm buffer API", version="1", description=__doc__)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error on %s: %s", request.url.path, exc)
        return JSONResponse({"detail": f"redis unavailable: {exc}"}, status_code=503)

    @app.exception_handler(TableConfigMismatch)
    async def _mismatch(request: Request, exc: TableConfigMismatch) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(TrajectoryDecodeError)
    async def _undecodable(request: Request, exc: TrajectoryDecodeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.get("/health", response_model=Health)
    def health() -> Any:
        try:
            ok = bool(r.ping())
        except redis.RedisError:
            ok = False
        body = Health(status="ok" if ok else "degraded", redis=ok)
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    # Prometheus: one registry per app; values read from Redis at scrape time.
    registry = CollectorRegistry()

    class _Collector:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            try:
                t = table(settings.table.name)
                s = t.stats()
            except (redis.RedisError, ValueError) as e:
                log.warning("metrics scrape failed: %s", e)
                return
            rt = rates.observe(s.name, s.inserts, s.samples)
            for metric, value, doc in [
                ("size", s.size, "items stored"), ("inserts", s.inserts, "items ever inserted"),
                ("samples", s.samples, "items ever handed out"), ("acks", s.acks, "items acked"),
                ("leased", s.leased, "items out on a lease"), ("removed", s.removed, "evicted by the remover"),
                ("dropped_stale", s.dropped_stale, "dropped for staleness"),
                ("consumed", s.consumed, "removed after max_times_sampled acks"),
                ("removed_unsampled", s.removed_unsampled, "left the table never sampled (never trained)"),
                ("sampled_distinct", s.sampled_distinct, "items sampled at least once"),
                ("insert_rate", rt.inserts_per_s, "inserts/s over the window"),
                ("sample_rate", rt.samples_per_s, "samples/s over the window"),
            ]:
                g = GaugeMetricFamily(f"tbrm_buffer_{metric}", doc, labels=["table"])
                g.add_metric([s.name], float(value))
                yield g

    registry.register(_Collector())

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    v1 = APIRouter(prefix="/v1")

    @v1.get("/config", response_model=BufferSettings.config_view())
    def config() -> dict[str, Any]:
        d = settings.model_dump(mode="json")
        d["auth_token"] = "***" if settings.auth_token else None
        return d

    def learner_version() -> int | None:
        st = LearnerStatusStore(r).get()
        if st is not None:
            return st.policy_version
        w = WeightsStore(r).latest()
        return w.version if w else None

    @v1.get("/tables/{name}/stats", response_model=TableStatsResponse)
    def table_stats(name: TableName) -> TableStatsResponse:
        t = table(name)
        s = t.stats()
        return TableStatsResponse(stats=s, rates=rates.observe(name, s.inserts, s.samples),
                                  histograms=t.histograms(learner_version()))

    def summary(item_id: str, traj: Trajectory, meta: dict[str, Any]) -> TrajectorySummary:
        return TrajectorySummary(
            item_id=item_id, prompt_id=traj.prompt_id, group_id=traj.group_id, policy_version=traj.policy_version,
            reward=traj.reward, grade_status=traj.grade_status, actor_id=traj.actor_id,
            response_tokens=len(traj.response_token_ids), finish_reason=traj.finish_reason,
            times_sampled=meta["times_sampled"], times_acked=meta["times_acked"], priority=meta["priority"],
            leased=meta["leased"], inserted_at=meta.get("inserted_at", traj.created_at),
            has_reference=traj.ref_logprobs is not None,
        )

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
        filters = {k: v for k, v in dict(min_version=min_version, max_version=max_version, min_reward=min_reward,
                                         max_reward=max_reward, actor_id=actor_id, leased=leased,
                                         min_times_sampled=min_times_sampled).items() if v is not None}
        if cursor is not None:
            rows, nxt = table(name).page(cursor=cursor, limit=limit, **filters)
            return TrajectoryPage(total=None, offset=0, limit=limit, next_cursor=nxt,
                                  items=[summary(i, t, m) for i, t, m in rows])
        total, rows = table(name).list_items(offset=offset, limit=limit, **filters)
        return TrajectoryPage(total=total, offset=offset, limit=limit,
                              items=[summary(i, t, m) for i, t, m in rows])

    @v1.get("/tables/{name}/trajectories/{item_id}", response_model=TrajectoryDetail)
    def trajectory(name: TableName, item_id: ItemId) -> TrajectoryDetail:
        got = table(name).get(item_id)
        if got is None:
            raise HTTPException(404, f"no item {item_id!r} in table {name!r} (consumed, evicted or never inserted)")
        traj, meta = got
        return TrajectoryDetail(summary=summary(item_id, traj, meta), trajectory=traj)

    @v1.get("/tables/{name}/leases", response_model=LeasesResponse)
    def leases(name: TableName, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> LeasesResponse:
        """Leases out now, expiring first (id, expiry, items drawn, items still held)."""
        return LeasesResponse(leases=[LeaseView(**x) for x in table(name).leases(limit)])

    @v1.get("/prompts/claims", response_model=ClaimsResponse)
    def prompt_claims(name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ClaimsResponse:
        """Prompt claims held by actors, expiring first."""
        return ClaimsResponse(claims=[ClaimView(**x) for x in PromptQueue(r, name or settings.prompt_queue).claims(limit)])

    @v1.get("/actors", response_model=ActorsResponse)
    def actors() -> ActorsResponse:
        latest = WeightsStore(r).latest()
        s, us = r.time()
        now = s + us / 1e6
        views = [
            ActorView(info=a, live=live, seconds_since_heartbeat=max(0.0, now - a.last_heartbeat),
                      version_skew=None if latest is None else latest.version - a.policy_version)
            for a, live in ActorRegistry(r).all()
        ]
        return ActorsResponse(latest_weights_version=latest.version if latest else None, actors=views)

    @v1.get("/weights", response_model=WeightsResponse)
    def weights() -> WeightsResponse:
        return WeightsResponse(latest=WeightsStore(r).latest())

    @v1.get("/learner", response_model=LearnerResponse)
    def learner() -> LearnerResponse:
        return LearnerResponse(status=LearnerStatusStore(r).get())

    @v1.get("/prompts", response_model=PromptsResponse)
    def prompts(name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None) -> PromptsResponse:
        return PromptsResponse(**PromptQueue(r, name or settings.prompt_queue).info())

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    @admin.post("/pause", response_model=AdminResponse)
    def pause(req: PauseRequest) -> AdminResponse:
        t = table(req.table or settings.table.name)
        t.pause(req.what)
        log.info("admin: paused %s of table %s", req.what, t.keys.name)
        return AdminResponse(ok=True, detail=f"{req.what} paused", paused=t.stats().extra["paused"])

    @admin.post("/resume", response_model=AdminResponse)
    def resume(req: PauseRequest) -> AdminResponse:
        t = table(req.table or settings.table.name)
        t.resume(req.what)
        log.info("admin: resumed %s of table %s", req.what, t.keys.name)
        return AdminResponse(ok=True, detail=f"{req.what} resumed", paused=t.stats().extra["paused"])

    @admin.post("/reset", response_model=AdminResponse)
    def reset(req: ResetRequest) -> AdminResponse:
        name = req.table or settings.table.name
        t = table(name)
        if req.drop_config:
            t.drop()
            tables.pop(name, None)
        else:
            t.reset()
        log.warning("admin: reset table %s (drop_config=%s)", name, req.drop_config)
        return AdminResponse(ok=True, detail=f"table {name!r} reset")

    @admin.post("/export", response_model=ExportResponse)
    def export(req: ExportRequest) -> ExportResponse:
        t = table(req.table or settings.table.name)
        root = settings.export_dir.resolve()
        path = (root / f"{req.name}.parquet").resolve()
        if path.parent != root:  # the pattern already forbids separators; belt and braces
            raise HTTPException(400, f"export name {req.name!r} escapes the export dir")
        if path.exists() and not req.overwrite:
            raise HTTPException(409, f"{path.name} exists in the export dir; pass overwrite=true")
        rows = export_parquet(t, path)
        return ExportResponse(path=str(path), rows=rows, bytes=path.stat().st_size)

    v1.include_router(admin)
    app.include_router(v1)
    return app
