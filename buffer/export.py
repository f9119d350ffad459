"""Export of a replay table to parquet, page by page (memory bounded by one page, not the table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from buffer.schema import Trajectory
from buffer.table import ReplayTable


def export_parquet(t: ReplayTable, path: Path) -> int:
    """Write every stored item (trajectory fields + bookkeeping) to a parquet file; returns the row count."""
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
