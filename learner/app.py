"""The learner's status HTTP server (read-only): `/health`, `/metrics` (Prometheus), `/v1/status`, `/v1/config`.

It runs in the learner process (rank 0) next to the training loop and reads the loop's `LiveStatus`; it never
touches the model, so a slow scrape cannot stall training. Build it with `create_app(settings, live)`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from buffer.schema import WeightsInfo
from learner.live import LiveStatus
from learner.metrics import GAUGES, prometheus_name
from learner.settings import LearnerSettings


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str
    """`ok` unless the training loop failed."""
    state: str
    """Loop state: starting, running, stopped or failed."""
    step: int
    policy_version: int


class StatusResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: str
    step: int
    policy_version: int
    started_at: float
    uptime_s: float
    last_step_at: float | None
    metrics: dict[str, float] = Field(default_factory=dict)
    """The last metrics line (numeric values), as in metrics.jsonl."""
    latest_weights: WeightsInfo | None
    """The newest exported weights."""
    actors_delivered: dict[str, int]
    """Newest version this learner delivered to each actor it pushed to."""
    error: str


def create_app(settings: LearnerSettings, live: LiveStatus) -> FastAPI:
    app = FastAPI(title="tbrm learner", version="1", description="Status of the DeepSpeed learner (read-only).")
    registry = CollectorRegistry()
    gauges = {key: Gauge(prometheus_name(key), doc, registry=registry) for key, doc in GAUGES.items()}
    up = Gauge("tbrm_learner_running", "1 while the training loop runs", registry=registry)

    @app.get("/health", response_model=Health)
    def health() -> Any:
        snap = live.snapshot()
        body = Health(
            status="failed" if snap["state"] == "failed" else "ok", state=snap["state"], step=snap["step"],
            policy_version=snap["policy_version"],
        )
        return JSONResponse(body.model_dump(), status_code=503 if snap["state"] == "failed" else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        snap = live.snapshot()
        values = {**snap["metrics"], "step": snap["step"], "policy_version": snap["policy_version"]}
        for key, gauge in gauges.items():
            if key in values and values[key] is not None:
                gauge.set(float(values[key]))
        up.set(1.0 if snap["state"] == "running" else 0.0)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/status", response_model=StatusResponse)
    def status() -> StatusResponse:
        snap = live.snapshot()
        return StatusResponse(
            state=snap["state"], step=snap["step"], policy_version=snap["policy_version"],
            started_at=snap["started_at"], uptime_s=time.time() - snap["started_at"],
            last_step_at=snap["last_step_at"], metrics=snap["metrics"], latest_weights=snap["latest_weights"],
            actors_delivered=snap["actors_delivered"], error=snap["error"],
        )

    @v1.get("/config", response_model=LearnerSettings.config_view())
    def config() -> dict[str, Any]:
        return settings.redacted()

    app.include_router(v1)
    return app
