"""Inspection of a replay table (stats, histograms, listing, cursor pages): a mixin of `ReplayTable`."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import redis as redis_lib

from buffer import codec
from buffer.keys import TableKeys
from buffer.schema import TableConfig, TableStats, Trajectory
from buffer.table_types import _f, _s, split_meta

HISTOGRAM_SAMPLE = 20_000
"""Above this many stored items, histograms come from a uniform random sample of this many."""
PAGE_SCAN = 5_000
"""Most items one `page` call examines."""


_FILTERS = {"min_version", "max_version", "min_reward", "max_reward", "actor_id", "leased", "min_times_sampled"}


def _matches(f: dict[str, Any], ver: int, reward: float, actor: str, leased: bool, handed: int) -> bool:
    def out_of(lo: Any, hi: Any, x: float) -> bool:
        return lo is not None and x < lo or hi is not None and x > hi

    return not (out_of(f.get("min_version"), f.get("max_version"), ver)
                or out_of(f.get("min_reward"), f.get("max_reward"), reward)
                or f.get("actor_id") is not None and actor != f["actor_id"]
                or f.get("leased") is not None and leased != f["leased"]
                or f.get("min_times_sampled") is not None and handed < f["min_times_sampled"])


class TableViews:
    """Read-only views; the concrete table provides the attributes below and `reclaim_expired`."""

    redis: redis_lib.Redis
    keys: TableKeys
    config: TableConfig

    def reclaim_expired(self) -> int:
        raise NotImplementedError

    def counters(self) -> dict[str, float]:
        raw = self.redis.hgetall(self.keys.counters)
        return {_s(k): _f(v) for k, v in raw.items()}

    def stats(self) -> TableStats:
        self.reclaim_expired()
        k = self.keys
        p = self.redis.pipeline(transaction=True)
        p.zcard(k.order)
        p.zcard(k.avail)
        p.scard(k.avail_set)  # available items: in one of the two (buffer.keys), both only across versions
        p.hlen(k.lease_of)
        p.hgetall(k.counters)
        p.hgetall(k.paused)
        p.zcard(k.waiters)
        size, avail, avail_set, leased, raw, paused, waiting = p.execute()
        avail += avail_set
        c = {_s(a): _f(b) for a, b in raw.items()}
        rl = self.config.rate_limiter
        ins, smp = c.get("rl_inserts", 0.0), c.get("rl_samples", 0.0)
        limiter: dict[str, Any] = {"min_size_to_sample": rl.min_size_to_sample,
                                   "samples_per_insert": rl.samples_per_insert, "error_buffer": rl.error_buffer,
                                   "inserts": ins, "samples": smp, "waiting_inserts": waiting}
        if rl.samples_per_insert is not None:
            spi = rl.samples_per_insert
            diff = ins * spi - smp
            limiter.update(diff=diff, min_diff=spi * rl.min_size_to_sample - rl.error_buffer,
                           max_diff=spi * rl.min_size_to_sample + rl.error_buffer)
            limiter["can_insert"] = ins + 1 <= rl.min_size_to_sample or diff + spi <= limiter["max_diff"] or size == 0
            limiter["can_sample_one"] = size >= rl.min_size_to_sample and diff - 1 >= limiter["min_diff"]
        else:
            limiter["can_insert"] = True
            limiter["can_sample_one"] = size >= rl.min_size_to_sample
        return TableStats(
            name=k.name, size=size, max_size=self.config.max_size, inserts=int(c.get("inserts", 0)),
            samples=int(c.get("samples", 0)), acks=int(c.get("acks", 0)), removed=int(c.get("removed", 0)),
            dropped_stale=int(c.get("dropped_stale", 0)), leased=leased, consumed=int(c.get("consumed", 0)),
            removed_unsampled=int(c.get("removed_unsampled", 0)), sampled_distinct=int(c.get("sampled_distinct", 0)),
            extra={"available": avail, "consumed": int(c.get("consumed", 0)),
                   "max_priority": c.get("maxprio", 1.0),
                   "expired_lease_items": int(c.get("expired", 0)),
                   "paused": sorted(_s(x) for x in paused), "rate_limiter": limiter,
                   "config": self.config.model_dump()},
        )

    def histograms(self, learner_version: int | None = None) -> dict[str, Any]:
        """Version lag, times sampled and mean reward per policy version over the stored items, or over a
        uniform random sample of HISTOGRAM_SAMPLE of them in a larger table (bounded work per call)."""
        k = self.keys
        size = int(self.redis.zcard(k.order))
        sampled = size > HISTOGRAM_SAMPLE
        if sampled:
            pairs = self.redis.zrandmember(k.byver, HISTOGRAM_SAMPLE, withscores=True) or []
            byver = list(zip(pairs[0::2], pairs[1::2], strict=True))
        else:
            byver = self.redis.zrange(k.byver, 0, -1, withscores=True)
        ids = [item for item, _ in byver]
        p = self.redis.pipeline(transaction=False)
        p.hmget(k.handed, ids or ["-"])
        p.hmget(k.meta, ids or ["-"])
        handed, meta = p.execute()
        versions: dict[int, int] = {}
        reward_sum: dict[int, float] = {}
        times: dict[int, int] = {}
        for (_, v), h, m in zip(byver, handed, meta, strict=False):
            ver = int(float(v))
            versions[ver] = versions.get(ver, 0) + 1
            if m is not None:
                reward_sum[ver] = reward_sum.get(ver, 0.0) + split_meta(m)[2]
            times[int(h or 0)] = times.get(int(h or 0), 0) + 1
        out: dict[str, Any] = {
            "policy_version": {str(v): n for v, n in sorted(versions.items())},
            "times_sampled": {str(t): n for t, n in sorted(times.items())},
            "reward_by_version": {str(v): reward_sum.get(v, 0.0) / n for v, n in sorted(versions.items())},
            "sampled_items": {"of": float(size), "used": float(len(byver))} if sampled else {},
        }
        if learner_version is not None:
            lag: dict[str, int] = {}
            for v, n in sorted(versions.items(), reverse=True):
                lag[str(learner_version - v)] = lag.get(str(learner_version - v), 0) + n
            out["version_lag"] = lag
        return out

    def list_items(self, *, offset: int = 0, limit: int = 50, **filters: Any,
                   ) -> tuple[int, list[tuple[str, Trajectory, dict[str, Any]]]]:
        """Filtered page of stored items in insertion order: (total matching, [(id, trajectory, meta)]).
        O(N) in the table size (it counts every match): for large tables use `page` (a cursor).
        Filters as in `page`."""
        if limit < 1 or offset < 0:
            raise ValueError(f"limit={limit} must be >= 1 and offset={offset} >= 0")
        matches: list[tuple[str, float]] = []
        cursor: int | None = 0
        while cursor is not None:
            found, cursor = self._scan(cursor, 10**9, PAGE_SCAN, filters)
            matches += found
        return len(matches), self._load(matches[offset:offset + limit])

    def page(self, *, cursor: int = 0, limit: int = 50, **filters: Any,
             ) -> tuple[list[tuple[str, Trajectory, dict[str, Any]]], int | None]:
        """Up to `limit` stored items matching the filters, in insertion order after `cursor` (0 = from the
        start): ([(id, trajectory, meta)], next cursor, or None at the end). Bounded work per call: at most
        PAGE_SCAN items are examined, so a sparse filter may return a short (even empty) page with a cursor.

        Filters (all optional): min_version, max_version (policy_version), min_reward, max_reward, actor_id,
        leased (True/False), min_times_sampled."""
        if limit < 1 or cursor < 0:
            raise ValueError(f"limit={limit} must be >= 1 and cursor={cursor} >= 0")
        found, nxt = self._scan(cursor, limit, PAGE_SCAN, filters)
        return self._load(found), nxt

    def _load(self, found: list[tuple[str, float]]) -> list[tuple[str, Trajectory, dict[str, Any]]]:
        """The items of `found` that are still stored, with their bookkeeping: one round trip for the page."""
        if not found:
            return []
        k = self.keys
        ids = [item for item, _ in found]
        p = self.redis.pipeline(transaction=False)
        for key in (k.items, k.refs, k.handed, k.acked, k.prio, k.lease_of):
            p.hmget(key, ids)
        columns = p.execute()
        out = []
        for (item, ins), row in zip(found, zip(*columns, strict=True), strict=True):
            got = _item(*row)
            if got is not None:
                out.append((item, got[0], {**got[1], "inserted_at": ins}))
        return out

    def _scan(self, cursor: int, limit: int, budget: int, f: dict[str, Any],
              ) -> tuple[list[tuple[str, float]], int | None]:
        """(id, inserted_at) of up to `limit` matches after insertion sequence `cursor`, examining at most
        `budget` items; returns them and the cursor to continue from (None at the end)."""
        unknown = set(f) - _FILTERS
        if unknown:
            raise ValueError(f"unknown filters {sorted(unknown)}; known: {sorted(_FILTERS)}")
        k = self.keys
        out: list[tuple[str, float]] = []
        scanned = 0
        while len(out) < limit and scanned < budget:
            chunk = self.redis.zrangebyscore(k.order, f"({cursor}", "+inf", start=0, num=min(500, budget),
                                             withscores=True)
            if not chunk:
                return out, None
            ids = [_s(i) for i, _ in chunk]
            p = self.redis.pipeline(transaction=False)
            for key in (k.meta, k.handed, k.lease_of):
                p.hmget(key, ids)
            p.zmscore(k.byver, ids)
            metas, handed, owners, vers = p.execute()
            for item, (_, seq), m, h, owner, v in zip(ids, chunk, metas, handed, owners, vers, strict=True):
                cursor, scanned = int(seq), scanned + 1
                if m is None or v is None:
                    continue
                ins, _, reward, actor = split_meta(m)
                if _matches(f, int(v), reward, actor, owner is not None, int(h or 0)):
                    out.append((item, ins))
                    if len(out) >= limit:
                        break
        return out, cursor


    def leases(self, limit: int = 100) -> list[dict[str, Any]]:
        """The `limit` leases expiring first: id, expires_at (unix s), items drawn, items still held."""
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1")
        k = self.keys
        rows = self.redis.zrange(k.lease_exp, 0, limit - 1, withscores=True)
        out = []
        for lease, exp in rows:
            raw = self.redis.hget(k.leases, lease)
            ids = lease_ids(raw) if raw else []
            owners = self.redis.hmget(k.lease_of, ids) if ids else []
            out.append({"lease_id": _s(lease), "expires_at": float(exp), "items": len(ids),
                        "held": sum(1 for o in owners if o is not None and _s(o) == _s(lease))})
        return out

    def get(self, item_id: str) -> tuple[Trajectory, dict[str, Any]] | None:
        """One stored item and its bookkeeping, or None."""
        k = self.keys
        p = self.redis.pipeline(transaction=False)
        for key in (k.items, k.refs, k.handed, k.acked, k.prio, k.lease_of):
            p.hget(key, item_id)
        return _item(*p.execute())

    def size(self) -> int:
        return int(self.redis.zcard(self.keys.order))


def _item(payload: bytes | None, ref: bytes | None, handed: bytes | None, acked: bytes | None, prio: bytes | None,
          lease: bytes | None) -> tuple[Trajectory, dict[str, Any]] | None:
    """A stored item and its bookkeeping from its hash fields (None: not stored)."""
    if payload is None:
        return None
    return codec.decode(payload, ref or None), {
        "times_sampled": int(handed or 0), "times_acked": int(acked or 0),
        "priority": _f(prio) if prio is not None else 1.0, "leased": lease is not None,
    }


def lease_ids(raw: bytes) -> list[str]:
    """A lease's stored id list (msgpack; JSON as earlier versions wrote it)."""
    return json.loads(raw) if raw[:1] == b"[" else [_s(x) for x in msgpack.unpackb(raw)]
