"""Public library API of the buffer, used directly by actors and the learner (light: redis + pydantic).

    from buffer.client import connect, ReplayTable, PromptQueue, ActorRegistry, WeightsStore
    r = connect("redis://127.0.0.1:6379/0")
    table = ReplayTable(r, TableConfig(max_size=10_000))
    table.insert([traj, ...])                        # blocks on the rate limiter; InsertTimeout(.result)
    table.insert_encoded(table.encode_batch([...]))  # the same, encoded once for several tries
    batch = table.sample(32, learner_version=7)      # items leased for config.lease_s
    table.ack(batch.lease_id)                        # after the optimizer step

Semantics are defined by formula in `buffer.table`. Redis keys live in `buffer.keys` only.
"""

from __future__ import annotations

import redis

from buffer.codec import TrajectoryDecodeError, TrajectoryView, decode, encode
from buffer.columns import BatchStream, ColumnBatch
from buffer.prompt_queue import PromptQueue
from buffer.registry import ActorRegistry, LearnerStatusStore, WeightsStore
from buffer.schema import (
    ActorInfo,
    LearnerStatus,
    Prompt,
    SampleBatch,
    SampledItem,
    SampleInfo,
    TableConfig,
    TableStats,
    Trajectory,
    WeightsInfo,
)
from buffer.table import (
    BufferFull,
    EncodedBatch,
    InsertResult,
    InsertTimeout,
    RateLimitTimeout,
    ReplayTable,
    TableConfigMismatch,
)

__all__ = [
    "BatchStream", "BufferFull", "ColumnBatch", "EncodedBatch", "InsertResult", "InsertTimeout", "TrajectoryView",
    "ActorInfo", "ActorRegistry", "LearnerStatus", "LearnerStatusStore", "Prompt",
    "PromptQueue", "RateLimitTimeout", "ReplayTable", "SampleBatch", "SampleInfo", "SampledItem",
    "TableConfig", "TableConfigMismatch", "TableStats", "Trajectory", "TrajectoryDecodeError", "WeightsInfo",
    "WeightsStore", "connect", "decode", "encode",
]


def connect(url: str, *, timeout_s: float = 10.0) -> redis.Redis:
    """A redis.Redis for `url` with bounded socket timeouts, keepalive and retries on transient errors.

    Raises ValueError naming the url if it is not a redis:// / rediss:// / unix:// URL.
    """
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis url {url!r} must start with redis://, rediss:// or unix://")
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=min(timeout_s, 5.0),
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
