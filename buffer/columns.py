"""Columnar sample batches: per-item metadata as numpy columns, token arrays as zero-copy views of the stored
bytes, `Trajectory` objects only on demand (light: numpy + the codec; no other project package).

`ReplayTable.sample_columns` returns a `ColumnBatch`; `ReplayTable.sample` is `sample_columns(...).to_sample_batch()`.
`BatchStream` is the one-round-trip-per-step reader for a learner loop (see its docstring).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from redis.exceptions import NoScriptError

from buffer import codec, resp
from buffer.schema import SampleBatch, SampledItem, SampleInfo, Trajectory
from buffer.table_types import LEASE_ARG

log = logging.getLogger(__name__)


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
    _decoded: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def prompt_tokens(self, i: int) -> np.ndarray:
        return self.tokens("prompt_token_ids")[i]

    def response_tokens(self, i: int) -> np.ndarray:
        return self.tokens("response_token_ids")[i]

    def tokens(self, name: str) -> list[np.ndarray]:
        """The token arrays `name` ("prompt_token_ids" / "response_token_ids") of every item, decoded for the whole
        batch at the first access (compressed ids in one vectorized pass: `codec.arrays`) and kept."""
        got = self._decoded.get(name)
        if got is None:
            got = self._decoded[name] = codec.arrays(self.views, name)
        return got

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

    Each `next(learner_version)` sends one request: the payload fetch of the batch leased by the previous call
    (batch k), the writes queued since (`update_priorities`, `cache_references`, `renew`), and one sample script
    that renews batch k's lease (it waited a step; now it gets a full term for the step that trains it, as a
    freshly leased batch would), acks the leases queued by `ack` (or `next(..., ack=)`) and leases the following
    batch; it returns batch k. So step k carries the payloads of batch k, the acks released since the
    previous step, the previous step's priorities and reference caches, and the lease of batch k+1.

    - The first call, and a call after the table could not lease (blocked: empty, rate limiter, paused), cost
      one more round trip (the queued acks and writes, and a lease attempt); a blocked table is then polled by
      `ReplayTable.lease_batch`, which raises `RateLimitTimeout` after `timeout_s` (call again to keep waiting).
    - Versions: a batch's `age_versions` is computed against the `learner_version` of the call that returns it
      (the version it is trained at); batch k+1 is leased, and stale items dropped, for `lease_version`
      (default learner_version + 1, the version it is trained at when every step advances the version by one).
    - Leases: a prefetched lease waits one step before its renewal, so the table's `lease_s` must exceed a step
      comfortably; one that expired anyway (its items went back to the pool and may be in the next lease) is
      dropped with a warning and the next batch is returned instead.
    - Failures: acks and writes stay queued until a reply arrives (every queued operation is safe to send
      twice), and the next lease keeps its request id until it is granted, so a retried call strands nothing.
    - `close()` sends what is queued and releases the prefetched lease (its items are sampleable at once);
      `flush()` sends what is queued now. `prefetched()` names the lease held for the next step.
    """

    def __init__(self, table: Any, batch_size: int, *, lease_s: float | None = None,
                 timeout_s: float | None = 30.0) -> None:
        self.table, self.batch_size, self.lease_s, self.timeout_s = table, batch_size, lease_s, timeout_s
        self._pending: tuple[list[Any], str] | None = None
        self._request_id: str | None = None
        self._acks: list[str] = []
        self._ack_items = 0
        self._writes: list[tuple[list[Any], Callable[[Any], Any] | None]] = []

    def prefetched(self) -> str | None:
        return None if self._pending is None else self._pending[1]

    # ---- queued with the next round trip ----

    def ack(self, lease_ids: list[str], items: int | None = None) -> None:
        """Ack these leases in full with the next round trip; `items`: how many they hold (a warning is logged
        when fewer are acked: the rest had expired or were evicted)."""
        self._acks += lease_ids
        self._ack_items += items or 0

    def update_priorities(self, priorities: dict[str, float]) -> None:
        """`ReplayTable.update_priorities`, sent with the next round trip (before its lease)."""
        args = self.table.priority_args(priorities)
        if len(args) > 1:
            self._writes.append((args, None))

    def cache_references(self, refs: dict[str, tuple[Any, float | None]]) -> None:
        """`ReplayTable.cache_references`, sent with the next round trip."""
        if refs:
            self._writes.append((self.table.reference_args(refs), None))

    def renew(self, lease_ids: list[str], lease_s: float | None = None,
              on_reply: Callable[[int], Any] | None = None) -> None:
        """`ReplayTable.renew`, sent with the next round trip; `on_reply` gets how many were still alive."""
        args = self.table.renew_args(lease_ids, lease_s)
        if len(args) > 2:
            self._writes.append((args, None if on_reply is None else lambda n: on_reply(int(n))))

    # ---- round trips ----

    def next(self, learner_version: int, ack: list[str] | None = None, *,
             lease_version: int | None = None) -> ColumnBatch:
        """Batch k (leased by the previous call) with its payloads; batch k+1 leased in the same round trip."""
        if ack:
            self.ack(ack)
        while True:
            if self._pending is None:
                self._pending = self._lease(learner_version)
            res, lease_id = self._pending
            ids = res[8:]
            nxt = self._sample_args(learner_version + 1 if lease_version is None else lease_version, lease_id)
            out = self._send(ids, [("sample", nxt)], refs=int(res[6]) == 1)
            payloads, refs, got = out[0], out[1], out[-1]
            ok = _id(got[0]) == "ok"
            self._pending = (got, nxt[LEASE_ARG]) if ok else None
            if int(got[5] if ok else got[4]) == 1:
                return self.table.columns(res, lease_id, learner_version, payloads, refs)
            log.warning("the prefetched lease %s expired before its step (raise lease_s above two steps): its %d "
                        "items went back to the pool; batch dropped", lease_id, len(ids))

    def flush(self) -> None:
        """Send the queued acks and writes now (one round trip; none if nothing is queued)."""
        self._close(release=False)

    def close(self) -> int:
        """Send what is queued and release the prefetched lease (one round trip); returns the items released."""
        return self._close(release=True)

    def _close(self, release: bool) -> int:
        lease = self.prefetched() if release else None
        acks = [("ack", [x, "*"]) for x in self._acks]
        if not (lease or acks or self._writes):
            return 0
        out = self._send([], [*acks, *([("update", ["release", lease])] if lease else [])], sample=False)
        self._check_acked(sum(int(x) for x in out[:len(acks)]))
        self._pending = None
        return int(out[-1]) if lease else 0

    def _lease(self, learner_version: int) -> tuple[list[Any], str]:
        """The blocked path: queued acks and writes with a lease attempt, then polling until the table leases."""
        args = self._sample_args(learner_version)
        got = self._send([], [("sample", args)])[-1]
        if _id(got[0]) != "ok":
            args = self._sample_args(learner_version)
            got = self.table.lease_batch(args, self.timeout_s)
        self._request_id = None
        return got, args[LEASE_ARG]

    def _sample_args(self, version: int, renew: str | None = None) -> list[Any]:
        self._request_id = self._request_id or uuid.uuid4().hex
        return self.table.sample_args(self.batch_size, version, self.lease_s, self._request_id, self._acks, renew)

    def _send(self, ids: list[Any], scripts: list[tuple[str, list[Any]]], sample: bool = True,
              refs: bool = True) -> list[Any]:
        """One request (`resp.roundtrip`): HMGET of the payloads and (if `refs`: the table holds some) cached
        references of `ids` (if any), the queued writes, then `scripts` (`sample`: the last is the sample script,
        carrying the queued acks); the payloads, the references (None each when not fetched) and the replies of
        `scripts`. The queue is cleared once the replies are in."""
        t = self.table
        writes = self._writes
        calls = [("update", args) for args, _ in writes] + scripts
        fetches = ([t._hmget_items, t._hmget_refs] if refs else [t._hmget_items]) if ids else []
        request: list[bytes] = []
        for fetch in fetches:
            fetch.add(request, *ids)
        for name, args in calls:
            t._evalsha[name].add(request, *args)
        out = resp.roundtrip(t.redis, request, len(fetches) + len(calls))
        fetched, replies = out[:len(out) - len(calls)], out[len(out) - len(calls):]
        for i, (name, args) in enumerate(calls):
            if isinstance(replies[i], NoScriptError):
                replies[i] = t._run(name, args)  # Redis restarted and lost its script cache: redis-py reloads it
        for x in fetched + replies:
            if isinstance(x, Exception):
                raise x
        self._writes = []
        for (_, on_reply), reply in zip(writes, replies, strict=False):
            if on_reply is not None:
                on_reply(reply)
        got = replies[-1]
        if sample:
            self._check_acked(int(got[4] if _id(got[0]) == "ok" else got[3]))
            if _id(got[0]) == "ok":
                self._request_id = None
        if ids and not refs:
            fetched.append([None] * len(ids))
        return fetched + replies[len(writes):]

    def _check_acked(self, acked: int) -> None:
        if acked < self._ack_items:
            log.warning("acked %d of %d items of the released leases: the rest had expired (their items went back "
                        "and may be trained again: raise lease_s) or were evicted", acked, self._ack_items)
        self._acks, self._ack_items = [], 0


def _num(x: Any) -> float:
    return float(x.decode() if isinstance(x, bytes) else x)


def build(res: list[Any], lease_id: str, learner_version: int, payloads: list[bytes | None],
          refs: list[bytes | None]) -> tuple[ColumnBatch, list[str]]:
    """A ColumnBatch from the sample script's reply and the fetched payloads; also the ids dropped because their
    payload was gone (evicted by a concurrent insert between the script and the fetch)."""
    raw_ids = res[8:]
    n = len(raw_ids)
    # one msgpack array: 3 numeric columns, then inserted_at and policy_version as doubles per item
    flat = msgpack.unpackb(res[7], raw=True) if n else [b""]
    heads = np.frombuffer(flat[-1], "<f8").reshape(n, 2).T
    cols = np.vstack((np.array(flat[:-1], dtype=np.float64).reshape(3, n), heads))
    keep = [k for k, p in enumerate(payloads) if p is not None]
    dropped = [_id(raw_ids[k]) for k, p in enumerate(payloads) if p is None]
    if dropped:
        cols = cols[:, keep]
    view = codec.view
    batch = ColumnBatch(
        lease_id=lease_id, lease_expires_at=_num(res[1]), buffer_size=int(res[2]),
        ids=[_id(raw_ids[k]) for k in keep], views=[view(payloads[k]) for k in keep], refs=[refs[k] for k in keep],
        times_sampled=cols[0].astype(np.int64), age_versions=learner_version - cols[4].astype(np.int64),
        priority=cols[1], probability=cols[2], inserted_at=cols[3], acked=int(res[4]))
    return batch, dropped


def _id(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
