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
from learner.settings import LearnerSettings

# metric key in the loop's metrics line -> (Prometheus name, help)
GAUGES: dict[str, tuple[str, str]] = {
    "step": ("tbrm_learner_step", "Optimizer steps taken"),
    "policy_version": ("tbrm_learner_policy_version", "Current policy version (one per step)"),
    "loss": ("tbrm_learner_loss", "Loss of the last step"),
    "residual_mean": ("tbrm_learner_residual_mean", "Mean TBRM residual delta(tau) of the last batch"),
    "residual_std": ("tbrm_learner_residual_std", "Std of the TBRM residuals of the last batch"),
    "residual_abs_max": ("tbrm_learner_residual_abs_max", "Max |residual| of the last batch"),
    "v0_mean": ("tbrm_learner_v0_mean", "Mean V(s_1) = logsumexp of the policy logits at the last prompt token"),
    "log_ratio_sum_mean": ("tbrm_learner_log_ratio_sum_mean", "Mean summed log(pi/pi_ref) over the response"),
    "batch_reward_mean": ("tbrm_learner_reward_mean", "Mean reward of the last batch"),
    "frac_correct": ("tbrm_learner_frac_correct", "Fraction of the last batch graded correct"),
    "version_lag_mean": ("tbrm_learner_version_lag_mean", "Mean learner_version - policy_version of the batch"),
    "version_lag_max": ("tbrm_learner_version_lag_max", "Max learner_version - policy_version of the batch"),
    "grad_norm": ("tbrm_learner_grad_norm", "Global gradient norm before clipping"),
    "lr": ("tbrm_learner_lr", "Learning rate of the last step"),
    "step_time_s": ("tbrm_learner_step_seconds", "Wall time of the last step (sample to push)"),
    "sample_time_s": ("tbrm_learner_sample_seconds", "Time waiting for the batch"),
    "ref_time_s": ("tbrm_learner_ref_seconds", "Time of the reference forward (0 when cached)"),
    "train_time_s": ("tbrm_learner_train_seconds", "Forward/backward/step time"),
    "tokens_per_s": ("tbrm_learner_tokens_per_second", "Tokens processed per second of training compute"),
    "push_latency_s": ("tbrm_learner_push_latency_seconds", "Latency of the last successful weight push"),
    "pushes_ok": ("tbrm_learner_pushes_ok", "Successful weight pushes since start"),
    "pushes_failed": ("tbrm_learner_pushes_failed", "Failed weight pushes since start"),
    "buffer_size": ("tbrm_learner_buffer_size", "Replay table size seen by the last sample"),
    "age_s_mean": ("tbrm_learner_age_seconds_mean", "Mean seconds since the trained trajectories were generated"),
    "reuse_ratio": ("tbrm_learner_reuse_ratio", "Items sampled per item inserted in the replay table"),
    "never_trained_frac": ("tbrm_learner_never_trained_frac", "Inserted trajectories never sampled, over inserts"),
    "residual_mean_correct": ("tbrm_learner_residual_mean_correct", "Mean residual of rewarded trajectories"),
    "residual_mean_incorrect": ("tbrm_learner_residual_mean_incorrect", "Mean residual of unrewarded trajectories"),
    "log_ratio_sum_mean_incorrect": ("tbrm_learner_log_ratio_sum_mean_incorrect",
                                     "Mean summed log(pi/pi_ref) of unrewarded trajectories"),
    "kl_snis": ("tbrm_learner_kl_snis", "Self-normalized IS estimate of KL(pi || pi_ref) on the batch"),
    "grad_clipped": ("tbrm_learner_grad_clipped", "1 if the last step's gradient norm was clipped"),
    "guard_skipped_steps": ("tbrm_learner_guard_skipped_steps", "Steps skipped for a non-finite loss or gradient"),
    "guard_responses": ("tbrm_learner_guard_responses", "Stability-guard responses (rollback / lr back-off)"),
}


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
    gauges = {key: Gauge(name, doc, registry=registry) for key, (name, doc) in GAUGES.items()}
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
