"""Errors and results of `buffer.table.ReplayTable` (light: standard library only)."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

LEASE_ARG, RENEW_ARG = 3, 7
"""Where `ReplayTable.sample_args` puts the lease id (the caller's request id), and the lease to renew (the leases to
ack follow it)."""


class RateLimitTimeout(TimeoutError):
    """insert/sample waited `timeout_s` on the rate limiter (or a pause, or too few items) and gave up."""


class InsertTimeout(RateLimitTimeout):
    """An insert gave up after `timeout_s`; `.result` says which ids were admitted, duplicate or still pending."""

    def __init__(self, message: str, result: InsertResult) -> None:
        super().__init__(message)
        self.result = result


class TableConfigMismatch(ValueError):
    """The table already exists in Redis with a different TableConfig."""


@dataclasses.dataclass
class InsertResult:
    """What one insert did, per id (every id of the call is in exactly one list)."""

    admitted: list[str] = dataclasses.field(default_factory=list)
    """Stored by this call."""
    duplicates: list[str] = dataclasses.field(default_factory=list)
    """Not stored: already stored, removed recently enough to be remembered, or repeated within the call."""
    pending: list[str] = dataclasses.field(default_factory=list)
    """Not admitted before the timeout (only non-empty in `InsertTimeout.result`): insert these again."""


Row = tuple[str, bytes, list[Any]]
"""One encoded item of an insert: (item id, payload, the insert script's metadata of it)."""


@dataclasses.dataclass
class EncodedBatch:
    """Trajectories encoded by `ReplayTable.encode_batch`, ready for `insert_encoded` (any number of times)."""

    rows: list[Row] = dataclasses.field(default_factory=list)
    repeated: list[str] = dataclasses.field(default_factory=list)
    """Ids repeated within the call: duplicates of their first copy, not sent."""


class BufferFull(InsertTimeout):
    """Inserts refused for memory: Redis used_memory reached the table's guard (`memory_limit_bytes`, else 90%
    of Redis's maxmemory; raised after `timeout_s` of waiting), or Redis itself refused a write for its maxmemory
    (raised at once; nothing of that write was stored)."""



def _f(x: Any) -> float:
    return float(x.decode() if isinstance(x, bytes) else x)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


META_HEAD = struct.Struct("<dd")
"""inserted_at and policy_version at the head of a `meta` entry (after its NUL)."""


def split_meta(raw: bytes) -> tuple[float, float | None, float, str]:
    """An item's `meta` entry -> (inserted_at, policy_version, reward, actor_id). The entry is NUL, inserted_at and
    policy_version as little-endian doubles, then "reward|actor_id"; one written by an earlier version is
    "inserted_at|reward|actor_id" (policy_version None: the `byver` zset has it)."""
    if raw[:1] == b"\0":
        ins, ver = META_HEAD.unpack_from(raw, 1)
        reward, actor = raw[1 + META_HEAD.size:].decode().split("|", 1)
        return ins, ver, float(reward), actor
    stamp, reward, actor = _s(raw).split("|", 2)
    return float(stamp), None, float(reward), actor
