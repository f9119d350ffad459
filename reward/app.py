"""The reward service: FastAPI app around the grading library and the supervised worker pool.

Routes: ``POST /v1/grade`` (wire format: ``reward.schema``), ``GET /health``, ``GET /metrics``, ``GET /v1/config``.
Grading an item: cache lookup -> extraction/normalization/fast path (no sympy, in a thread) -> math-verify in a
worker process for what is left (identical pairs in one batch are verified once).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict

from common.body_limit import BodyLimit
from reward.grading import Prepared, prepare
from reward.pool import WorkerPool
from reward.schema import (
    MAX_BATCH_ITEMS,
    MAX_GOLD_CHARS,
    GradeItem,
    GradeRequest,
    GradeResponse,
    GradeResult,
    valid_unicode,
)
from reward.settings import RewardSettings

log = logging.getLogger(__name__)


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str
    """`ok` when the worker pool is up."""
    workers: int
    """Live worker processes."""
    worker_restarts: int
    """Workers replaced since start (hard timeouts, deaths)."""
    worker_pids: list[int]
    """PIDs of the worker processes (for operators and tests)."""


class ConfigView(BaseModel):
    model_config = ConfigDict(extra="forbid")
    settings: dict[str, Any]
    """Effective settings (the reward service holds no secrets)."""
    versions: dict[str, str | None]
    """Versions of the grading libraries (grading results depend on them)."""


class VerdictCache:
    """Bounded LRU: (sha256(response), gold) -> (status, extracted). Timeouts and errors are not cached."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._data: OrderedDict[tuple[bytes, str], tuple[str, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(item: GradeItem) -> tuple[bytes, str]:
        return hashlib.sha256(item.response.encode("utf-8", "surrogatepass")).digest(), item.gold

    def get(self, key: tuple[bytes, str]) -> tuple[str, str | None] | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: tuple[bytes, str], value: tuple[str, str | None]) -> None:
        if self.max_size <= 0 or value[0] in ("timeout", "error"):
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Metrics:
    """Prometheus metrics on a per-app registry (several apps can live in one test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.grades = Counter("tbrm_reward_grades_total", "Graded items by status", ["status"], registry=r)
        self.paths = Counter("tbrm_reward_decided_total", "Items by deciding stage", ["stage"], registry=r)
        self.request_latency = Histogram(
            "tbrm_reward_request_seconds", "Latency of POST /v1/grade", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.verify_latency = Histogram(
            "tbrm_reward_verify_seconds", "Latency of one math-verify call in a worker (incl. queueing)",
            registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.timeouts = Counter("tbrm_reward_timeouts_total", "Items that timed out", registry=r)
        self.restarts = Counter("tbrm_reward_worker_restarts_total", "Workers killed and replaced", ["reason"],
                                registry=r)
        self.cache_hits = Counter("tbrm_reward_cache_hits_total", "Items answered from the cache", registry=r)
        self.cache_size = Gauge("tbrm_reward_cache_entries", "Entries in the verdict cache", registry=r)
        self.batch_items = Histogram("tbrm_reward_batch_items", "Items per grade request", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))


class Grader:
    """Cache + fast path + worker pool; the domain object behind the routes."""

    def __init__(self, settings: RewardSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache = VerdictCache(settings.cache_size)
        self.pool = WorkerPool(
            size=settings.workers,
            soft_timeout_s=settings.soft_timeout_s,
            hard_timeout_s=settings.hard_timeout_s,
            memory_limit_mb=settings.worker_memory_mb,
            on_restart=lambda why: metrics.restarts.labels(reason=why.split(":")[0].split(" ")[0]).inc(),
        )

    def _prepare_all(self, items: list[GradeItem]) -> list[Prepared | None]:
        out: list[Prepared | None] = []
        for it in items:
            try:
                out.append(prepare(it.response, it.gold, self.settings.max_answer_chars))
            except Exception:  # - a grader bug on one item must not fail the batch
                log.exception("prepare failed")
                out.append(None)
        return out

    async def _verify(self, pred: str, gold: str) -> str:
        t0 = time.perf_counter()
        status = await self.pool.verify(pred, gold)
        self.metrics.verify_latency.observe(time.perf_counter() - t0)
        return status

    async def grade(self, items: list[GradeItem]) -> list[GradeResult]:
        m = self.metrics
        verdicts: list[tuple[str, str | None] | None] = [None] * len(items)
        keys = [self.cache.key(it) for it in items]
        todo: list[int] = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is not None:
                verdicts[i] = hit
                m.cache_hits.inc()
            else:
                todo.append(i)
        if todo:
            # Extraction/normalization is pure Python: run it off the event loop so /health stays responsive.
            preps = await asyncio.to_thread(self._prepare_all, [items[i] for i in todo])
            tasks: dict[tuple[str, str], asyncio.Task[str]] = {}
            waiting: list[tuple[int, Prepared, asyncio.Task[str]]] = []
            for i, prep in zip(todo, preps, strict=True):
                if prep is None:
                    verdicts[i] = ("error", None)
                elif prep.verdict is not None:
                    verdicts[i] = (prep.verdict, prep.extracted)
                    m.paths.labels(stage="fast").inc()
                else:
                    pair = (prep.pred, prep.gold)
                    if pair not in tasks:  # n samples of one prompt often agree: verify each pair once
                        tasks[pair] = asyncio.ensure_future(self._verify(*pair))
                    waiting.append((i, prep, tasks[pair]))
            if tasks:
                await asyncio.gather(*tasks.values())
            for i, prep, task in waiting:
                verdicts[i] = (task.result(), prep.extracted)
                m.paths.labels(stage="math_verify").inc()
            for i in todo:
                v = verdicts[i]
                assert v is not None
                self.cache.put(keys[i], v)
            m.cache_size.set(len(self.cache))
        results = []
        for v in verdicts:
            assert v is not None
            status, extracted = v
            m.grades.labels(status=status).inc()
            if status == "timeout":
                m.timeouts.inc()
            results.append(GradeResult(score=self.settings.scores.score(status), status=status, extracted=extracted))
        return results


_REQUEST_SHAPE = (f'expected {{"items": [{{"response": "<text>", "gold": "<text>"}}, ...]}} with 1 to {MAX_BATCH_ITEMS} '
                  f"items, both fields strings, gold at most {MAX_GOLD_CHARS} characters")


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad field and the expected shape. The offending input is never echoed: it can be megabytes
    long or hold text that does not encode (FastAPI's default handler failed with 500 on lone surrogates)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": [valid_unicode(str(part)) for part in e.get("loc", ())],
               "msg": valid_unicode(str(e.get("msg", "invalid"))), "type": str(e.get("type", "invalid"))}
              for e in errors[:20]]
    return JSONResponse({"detail": detail, "hint": _REQUEST_SHAPE}, status_code=422)


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def create_app(settings: RewardSettings | None = None) -> FastAPI:
    """Build the app; the worker pool starts in the lifespan (so TestClient/uvicorn own its lifetime)."""
    settings = settings or RewardSettings()
    metrics = Metrics()
    grader = Grader(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await grader.pool.start()
        await grader.pool.warmup()
        log.info("reward service ready: %d workers", settings.workers)
        try:
            yield
        finally:
            await grader.pool.close()

    app = FastAPI(title="tbrm reward", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.state.grader = grader
    app.state.settings = settings
    router = APIRouter(prefix="/v1")

    @router.post("/grade", response_model=GradeResponse)
    async def grade(req: GradeRequest) -> GradeResponse:
        """Grade a batch; results come back in input order."""
        t0 = time.perf_counter()
        results = await grader.grade(req.items)
        metrics.request_latency.observe(time.perf_counter() - t0)
        metrics.batch_items.observe(len(req.items))
        return GradeResponse(results=results)

    @router.get("/config", response_model=ConfigView)
    async def config() -> ConfigView:
        """Effective settings (the reward service holds no secrets) and library versions."""
        return ConfigView(settings=settings.model_dump(mode="json"),
                          versions={name: _pkg_version(name)
                                    for name in ("math-verify", "sympy", "latex2sympy2_extended")})

    app.include_router(router)

    @app.get("/health", response_model=Health)
    async def health() -> Health | JSONResponse:
        alive = grader.pool.alive()
        body = Health(status="ok" if alive > 0 else "degraded", workers=alive,
                      worker_restarts=grader.pool.restarts, worker_pids=grader.pool.pids())
        if alive == 0:
            return JSONResponse(body.model_dump(), status_code=503)
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prom() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes,
                       detail=f"request body over {settings.max_body_bytes} bytes; send smaller batches")
    return app
