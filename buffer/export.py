"""Export of a replay table to parquet, page by page (memory bounded by one page, not the table), as a background
job of the buffer service: a million items take minutes, longer than any HTTP client waits."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from buffer.api_models import ExportJob
from buffer.schema import Trajectory
from buffer.table import ReplayTable

log = logging.getLogger("buffer.export")


def export_parquet(t: ReplayTable, path: Path, progress: Callable[[int], None] = lambda rows: None) -> int:
    """Write every stored item (trajectory fields + bookkeeping) to a parquet file; returns the row count.
    `progress(rows)` is called after each page. The file appears (atomically renamed) only when complete."""
    import pyarrow as pa  # only the export needs it
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    writer: pq.ParquetWriter | None = None
    n = 0
    cursor: int | None = 0
    try:
        while cursor is not None:  # page by page: memory bounded by one page, not the table
            page, cursor = t.page(cursor=cursor, limit=500)
            if not page:
                continue
            rows = [{"item_id": item_id, **traj.model_dump(), **{f"buffer_{k}": v for k, v in meta.items()}}
                    for item_id, traj, meta in page]
            if writer is None:
                writer = pq.ParquetWriter(tmp, _export_schema(pa))
            writer.write_table(pa.Table.from_pylist(rows, schema=writer.schema))
            n += len(rows)
            progress(n)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        pq.write_table(pa.table({"item_id": pa.array([], pa.string())}), tmp)
    tmp.replace(path)
    return n


def _export_schema(pa: Any) -> Any:
    """A fixed arrow schema (Trajectory fields + buffer_* bookkeeping), so that every page of an export has the
    same types even when a page holds only None in an optional column."""
    scalar = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}
    fields = [pa.field("item_id", pa.string())]
    for name, f in Trajectory.model_fields.items():
        ann = f.annotation
        args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
        if getattr(ann, "__origin__", None) is None and args:  # X | None
            ann = args[0]
            args = list(getattr(ann, "__args__", ()))
        if getattr(ann, "__origin__", None) is list:
            fields.append(pa.field(name, pa.list_(scalar[args[0]])))
        else:
            fields.append(pa.field(name, scalar.get(ann, pa.string())))
    for name, typ in (("times_sampled", int), ("times_acked", int), ("priority", float), ("leased", bool),
                      ("inserted_at", float)):
        fields.append(pa.field(f"buffer_{name}", scalar[typ]))
    return pa.schema(fields)


class ExportJobs:
    """The service's export jobs: one runs at a time, on its own thread; the last `keep` are remembered."""

    def __init__(self, keep: int = 50) -> None:
        self._jobs: OrderedDict[str, ExportJob] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep

    def start(self, t: ReplayTable, path: Path) -> ExportJob:
        """Start exporting `t` to `path`; raises RuntimeError naming the running job if one runs."""
        with self._lock:
            running = [j for j in self._jobs.values() if j.state == "running"]
            if running:
                raise RuntimeError(f"export {running[0].job_id} ({running[0].path}) is still running; "
                                   f"poll GET /v1/admin/exports/{running[0].job_id} and retry when it is done")
            job = ExportJob(job_id=uuid.uuid4().hex[:16], table=t.config.name, path=str(path), state="running",
                            started_at=time.time())
            self._jobs[job.job_id] = job
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job.job_id, t, path), name=f"export-{job.job_id}",
                         daemon=True).start()
        return job.model_copy()

    def _run(self, job_id: str, t: ReplayTable, path: Path) -> None:
        try:
            rows = export_parquet(t, path, progress=lambda n: self._update(job_id, rows=n))
            self._update(job_id, rows=rows, bytes=path.stat().st_size, state="done", finished_at=time.time())
            log.info("export %s: %d rows to %s", job_id, rows, path)
        except Exception as e:  # reported in the job's state
            log.exception("export %s to %s failed", job_id, path)
            self._update(job_id, state="failed", error=f"{type(e).__name__}: {e}", finished_at=time.time())

    def _update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                self._jobs[job_id] = job.model_copy(update=fields)

    def get(self, job_id: str) -> ExportJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.model_copy()

    def all(self) -> list[ExportJob]:
        with self._lock:
            return [j.model_copy() for j in self._jobs.values()]
