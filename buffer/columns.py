"""Columnar sample batches: per-item metadata as numpy columns, token arrays as zero-copy views of the stored
bytes, `Trajectory` objects only on demand (light: numpy + the codec; no other project package).

`ReplayTable.sample_columns` returns a `ColumnBatch`; `ReplayTable.sample` is `sample_columns(...).to_sample_batch()`.
`BatchStream` is the one-round-trip-per-step reader for a learner loop (see its docstring).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from buffer import codec
from buffer.schema import SampleBatch, SampledItem, SampleInfo, Trajectory


@dataclasses.dataclass
class ColumnBatch:
    """A leased batch. Column i belongs to `ids[i]`; arrays returned by the accessors are read-only views."""

    lease_id: str
    lease_expires_at: float
    buffer_size: int
    ids: list[str]
    views: list[codec.TrajectoryView]
    refs: list[bytes | None]
    times_sampled: np.ndarray
    age_versions: np.ndarray
    priority: np.ndarray
    probability: np.ndarray
    inserted_at: np.ndarray
    acked: int = 0
    """Items of the leases passed as `ack=` that this call acknowledged."""

    def __len__(self) -> int:
        return len(self.ids)

    def prompt_tokens(self, i: int) -> np.ndarray:
        return self.views[i].array("prompt_token_ids")

    def response_tokens(self, i: int) -> np.ndarray:
        return self.views[i].array("response_token_ids")

    def behaviour_logprobs(self, i: int) -> np.ndarray:
        return self.views[i].array("behaviour_logprobs")

    def ref_logprobs(self, i: int) -> np.ndarray | None:
        """Cached reference log-probs (float32 view), or None when not cached yet."""
        ref = self.refs[i]
        return codec.ref_array(ref) if ref else self.views[i].array("ref_logprobs")

    def field(self, name: str) -> list[Any]:
        """A scalar Trajectory field (e.g. "reward", "policy_version", "group_id") for every item."""
        return [v.header[name] for v in self.views]

    def trajectory(self, i: int) -> Trajectory:
        """Item i as a Trajectory (lists built now; not validated again: it was validated at insert)."""
        d = self.views[i].to_dict()
        if self.refs[i]:
            d["ref_logprobs"], d["ref_v0"] = codec.decode_ref(self.refs[i])
        return Trajectory.model_construct(**d)

    def to_sample_batch(self) -> SampleBatch:
        items = []
        for i, item_id in enumerate(self.ids):
            # model_construct: every value is already of the declared type
            info = SampleInfo.model_construct(
                item_id=item_id, times_sampled=int(self.times_sampled[i]), age_versions=int(self.age_versions[i]),
                priority=float(self.priority[i]), probability=float(self.probability[i]),
                buffer_size=self.buffer_size, inserted_at=float(self.inserted_at[i]))
            items.append(SampledItem.model_construct(info=info, trajectory=self.trajectory(i)))
        return SampleBatch(lease_id=self.lease_id, lease_expires_at=self.lease_expires_at, items=items)


class BatchStream:
    """One Redis round trip per learner step.

    Each `next(learner_version, ack=[...])` sends one pipeline: the payload fetch of the batch leased by the
    previous call, and the sample script that acks the leases in `ack` and leases the following batch; it
    returns the previously leased batch. So step k carries the payloads of batch k, the ack of batch k-1 and
    the lease of batch k+1. The first call, and a call after the table could not lease (blocked), cost one
    more round trip. A prefetched batch's lease runs while it waits one step, and its `age_versions` is
    computed against the learner version of the call that leased it. `prefetched()` names the lease held for
    the next step (ack it, or let it expire, when the loop ends).
    """

    def __init__(self, table: Any, batch_size: int, *, lease_s: float | None = None,
                 timeout_s: float | None = 30.0) -> None:
        self.table, self.batch_size, self.lease_s, self.timeout_s = table, batch_size, lease_s, timeout_s
        self._pending: tuple[list[Any], str, int] | None = None

    def prefetched(self) -> str | None:
        return None if self._pending is None else self._pending[1]

    def next(self, learner_version: int, ack: list[str] | None = None) -> ColumnBatch:
        t = self.table
        if self._pending is None:
            args = t.sample_args(self.batch_size, learner_version, self.lease_s, None, ack)
            self._pending = (t.lease_batch(args, self.timeout_s), args[4], learner_version)
            ack = None
        res, lease_id, version = self._pending
        ids = [_id(res[j]) for j in range(5, len(res), 6)]
        nxt = t.sample_args(self.batch_size, learner_version, self.lease_s, None, ack)
        script = t._scripts["sample"]
        p = t.redis.pipeline(transaction=False)
        p.execute_command("HMGET", t.keys.items, *ids)
        p.execute_command("HMGET", t.keys.refs, *ids)
        p.execute_command("EVALSHA", script.sha, t._nkeys, *t._keys_all, *t._hdr, *nxt)
        payloads, refs, got = p.execute(raise_on_error=False)
        for x in (payloads, refs):
            if isinstance(x, Exception):
                raise x
        if isinstance(got, Exception):
            if "NOSCRIPT" not in str(got):
                raise got
            got = t._run("sample", nxt)  # Redis restarted and lost its script cache: redis-py reloads it
        ok = _id(got[0]) == "ok"
        self._pending = (got, nxt[4], learner_version) if ok else None
        return t.columns(res, lease_id, version, payloads, refs)


def _num(x: Any) -> float:
    return float(x.decode() if isinstance(x, bytes) else x)


def build(res: list[Any], lease_id: str, learner_version: int, payloads: list[bytes | None],
          refs: list[bytes | None]) -> tuple[ColumnBatch, list[str]]:
    """A ColumnBatch from the sample script's reply and the fetched payloads; also the ids dropped because their
    payload was gone (evicted by a concurrent insert between the script and the fetch)."""
    rows = [res[j:j + 6] for j in range(5, len(res), 6)]
    keep = [k for k, p in enumerate(payloads) if p is not None]
    dropped = [_id(rows[k][0]) for k, p in enumerate(payloads) if p is None]
    rows = [rows[k] for k in keep]
    # numbers arrive as bytes (or ints): one vectorized conversion instead of 5 float() calls per item
    cols = np.array([r[1:6] for r in rows], dtype="S").astype(np.float64).reshape(-1, 5)
    batch = ColumnBatch(
        lease_id=lease_id, lease_expires_at=_num(res[1]), buffer_size=int(res[2]), ids=[_id(r[0]) for r in rows],
        views=[codec.view(payloads[k]) for k in keep], refs=[refs[k] for k in keep],
        times_sampled=cols[:, 0].astype(np.int64), age_versions=learner_version - cols[:, 1].astype(np.int64),
        priority=cols[:, 2], probability=cols[:, 3], inserted_at=cols[:, 4], acked=int(res[4]))
    return batch, dropped


def _id(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
