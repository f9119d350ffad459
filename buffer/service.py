"""What the buffer REST API does, without HTTP: the tables it opens, the rates it tracks, the views it builds, the
admin actions and the Prometheus gauges. `buffer.app` routes requests to one `BufferService`."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from fastapi import HTTPException
from prometheus_client.core import GaugeMetricFamily

from buffer.api_models import (
    ActorsResponse,
    ActorView,
    AdminResponse,
    ExportJob,
    ExportJobsResponse,
    ExportRequest,
    PauseRequest,
    Rates,
    ResetRequest,
    TableStatsResponse,
    TrajectoryDetail,
    TrajectoryPage,
    TrajectorySummary,
)
from buffer.client import ActorRegistry, LearnerStatusStore, PromptQueue, ReplayTable, WeightsStore, connect
from buffer.export import ExportJobs
from buffer.settings import BufferSettings

log = logging.getLogger("buffer.app")

class RateTracker:
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


class BufferService:
    """The buffer API's state (one Redis client, the opened tables, the rate windows) and its operations."""

    def __init__(self, settings: BufferSettings) -> None:
        self.settings = settings
        self.r = connect(settings.redis_url, timeout_s=settings.redis_timeout_s)
        self.rates = RateTracker(settings.rate_window_s)
        self.tables: dict[str, ReplayTable] = {}
        self.exports = ExportJobs()

    # ---- lookups

    def table(self, name: str | None = None) -> ReplayTable:
        """The table `name` (default: the configured one); others only if their config is stored, else 404."""
        name = name or self.settings.table.name
        if name in self.tables:
            return self.tables[name]
        if name == self.settings.table.name:
            t = ReplayTable(self.r, self.settings.table)
        elif self.r.exists(ReplayTable.config_key(name)):
            t = ReplayTable(self.r, None, name=name)
        else:
            raise HTTPException(404, f"no table {name!r} (configured table: {self.settings.table.name!r})")
        self.tables[name] = t
        return t

    def prompt_queue(self, name: str | None = None) -> PromptQueue:
        return PromptQueue(self.r, name or self.settings.prompt_queue)

    def redis_ok(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def learner_version(self) -> int | None:
        """The learner's policy version (its status, else the newest published weights)."""
        st = LearnerStatusStore(self.r).get()
        if st is not None:
            return st.policy_version
        w = WeightsStore(self.r).latest()
        return w.version if w else None

    # ---- views

    def table_stats(self, name: str) -> TableStatsResponse:
        t = self.table(name)
        s = t.stats()
        return TableStatsResponse(stats=s, rates=self.rates.observe(name, s.inserts, s.samples),
                                  histograms=t.histograms(self.learner_version()))  # fmt: skip

    def trajectory_page(self, name: str, offset: int, limit: int, cursor: int | None, **filters: Any) -> TrajectoryPage:
        """Offset mode counts every match (O(table size)); cursor mode examines a bounded number of items."""
        filters = {k: v for k, v in filters.items() if v is not None}
        if cursor is not None:
            rows, nxt = self.table(name).page(cursor=cursor, limit=limit, **filters)
            total, offset = None, 0
        else:
            (total, rows), nxt = self.table(name).list_items(offset=offset, limit=limit, **filters), None
        return TrajectoryPage(total=total, offset=offset, limit=limit, next_cursor=nxt,
                              items=[TrajectorySummary.of(i, t, m) for i, t, m in rows])  # fmt: skip

    def trajectory(self, name: str, item_id: str) -> TrajectoryDetail:
        got = self.table(name).get(item_id)
        if got is None:
            raise HTTPException(404, f"no item {item_id!r} in table {name!r} (consumed, evicted or never inserted)")
        traj, meta = got
        return TrajectoryDetail(summary=TrajectorySummary.of(item_id, traj, meta), trajectory=traj)

    def actors(self) -> ActorsResponse:
        latest = WeightsStore(self.r).latest()
        s, us = self.r.time()
        now = s + us / 1e6
        views = [
            ActorView(info=a, live=live, seconds_since_heartbeat=max(0.0, now - a.last_heartbeat),
                      version_skew=None if latest is None else latest.version - a.policy_version)
            for a, live in ActorRegistry(self.r).all()
        ]  # fmt: skip
        return ActorsResponse(latest_weights_version=latest.version if latest else None, actors=views)

    # ---- admin

    def set_paused(self, req: PauseRequest, paused: bool) -> AdminResponse:
        """Pause (or resume) sampling or inserts of a table."""
        t = self.table(req.table)
        verb = "paused" if paused else "resumed"
        (t.pause if paused else t.resume)(req.what)
        log.info("admin: %s %s of table %s", verb, req.what, t.keys.name)
        return AdminResponse(ok=True, detail=f"{req.what} {verb}", paused=t.stats().extra["paused"])

    def reset(self, req: ResetRequest) -> AdminResponse:
        name = req.table or self.settings.table.name
        t = self.table(name)
        if req.drop_config:
            t.drop()
            self.tables.pop(name, None)
        else:
            t.reset()
        log.warning("admin: reset table %s (drop_config=%s)", name, req.drop_config)
        return AdminResponse(ok=True, detail=f"table {name!r} reset")

    def export(self, req: ExportRequest) -> ExportJob:
        """Start a background export job (one at a time); follow it with `export_job`."""
        t = self.table(req.table)
        root = self.settings.export_dir.resolve()
        path = (root / f"{req.name}.parquet").resolve()
        if path.parent != root:  # the pattern already forbids separators; belt and braces
            raise HTTPException(400, f"export name {req.name!r} escapes the export dir")
        if path.exists() and not req.overwrite:
            raise HTTPException(409, f"{path.name} exists in the export dir; pass overwrite=true")
        try:
            return self.exports.start(t, path)
        except RuntimeError as e:
            raise HTTPException(409, str(e)) from None

    def export_job(self, job_id: str) -> ExportJob:
        job = self.exports.get(job_id)
        if job is None:
            raise HTTPException(404, f"no export job {job_id!r} (GET /v1/admin/exports lists the last 50)")
        return job

    def export_jobs(self) -> ExportJobsResponse:
        return ExportJobsResponse(jobs=self.exports.all())

    # ---- Prometheus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The configured table's gauges, read from Redis at scrape time (a prometheus_client collector)."""
        try:
            s = self.table().stats()
        except (redis.RedisError, ValueError) as e:
            log.warning("metrics scrape failed: %s", e)
            return
        rt = self.rates.observe(s.name, s.inserts, s.samples)
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
