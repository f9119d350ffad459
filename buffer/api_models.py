"""Request and response models of the buffer REST API (`buffer.app`); pydantic only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from buffer.schema import ActorInfo, LearnerStatus, TableStats, Trajectory, WeightsInfo

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
TableName = Annotated[str, PathParam(pattern=NAME_PATTERN)]
ItemId = Annotated[str, PathParam(max_length=200)]
JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{16}$")]


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

    @classmethod
    def of(cls, item_id: str, traj: Trajectory, meta: dict[str, Any]) -> TrajectorySummary:
        """The summary of a stored item (`meta`: its table bookkeeping, as `ReplayTable.get` returns it)."""
        return cls(
            item_id=item_id, prompt_id=traj.prompt_id, group_id=traj.group_id, policy_version=traj.policy_version,
            reward=traj.reward, grade_status=traj.grade_status, actor_id=traj.actor_id,
            response_tokens=len(traj.response_token_ids), finish_reason=traj.finish_reason,
            times_sampled=meta["times_sampled"], times_acked=meta["times_acked"], priority=meta["priority"],
            leased=meta["leased"], inserted_at=meta.get("inserted_at", traj.created_at),
            has_reference=traj.ref_logprobs is not None,
        )


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


class ExportJob(BaseModel):
    """A background export (POST /v1/admin/export starts one; GET /v1/admin/exports/{job_id} follows it)."""

    job_id: str
    table: str
    path: str
    """Where the parquet file appears (renamed into place when complete)."""
    state: Literal["running", "done", "failed"]
    rows: int = 0
    """Rows written so far."""
    bytes: int = 0
    """File size once done."""
    error: str | None = None
    started_at: float
    finished_at: float | None = None


class ExportJobsResponse(BaseModel):
    jobs: list[ExportJob]
    """Oldest first; the service remembers the last 50."""
