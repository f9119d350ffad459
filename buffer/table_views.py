"""Inspection of a replay table (stats, histograms, listing, cursor pages): a mixin of `ReplayTable`."""

from __future__ import annotations

from typing import Any

import redis as redis_lib

from buffer import codec
from buffer.keys import TableKeys
from buffer.schema import TableConfig, TableStats, Trajectory
from buffer.table_types import _f, _s

HISTOGRAM_SAMPLE = 20_000
"""Above this many stored items, histograms come from a uniform random sample of this many."""
PAGE_SCAN = 5_000
"""Most items one `page` call examines."""


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
        p.hlen(k.lease_of)
        p.hgetall(k.counters)
        p.hgetall(k.paused)
        size, avail, leased, raw, paused = p.execute()
        c = {_s(a): _f(b) for a, b in raw.items()}
        rl = self.config.rate_limiter
        ins, smp = c.get("rl_inserts", 0.0), c.get("rl_samples", 0.0)
        limiter: dict[str, Any] = {"min_size_to_sample": rl.min_size_to_sample,
                                   "samples_per_insert": rl.samples_per_insert, "error_buffer": rl.error_buffer,
                                   "inserts": ins, "samples": smp}
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
                reward_sum[ver] = reward_sum.get(ver, 0.0) + float(_s(m).split("|", 2)[1])
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

    def list_items(
        self,
        *,
        offset: int = 0,
        limit: int = 50,
        min_version: int | None = None,
        max_version: int | None = None,
        min_reward: float | None = None,
        max_reward: float | None = None,
        actor_id: str | None = None,
    ) -> tuple[int, list[tuple[str, Trajectory, dict[str, Any]]]]:
        """Filtered page of stored items in insertion order: (total matching, [(id, trajectory, meta)]).
        O(N) in the table size (it counts every match): for large tables use `page` (a cursor)."""
        if limit < 1 or offset < 0:
            raise ValueError(f"limit={limit} must be >= 1 and offset={offset} >= 0")
        k = self.keys
        lo = "-inf" if min_version is None else min_version
        hi = "+inf" if max_version is None else max_version
        cand = [_s(x) for x in self.redis.zrangebyscore(k.byver, lo, hi)]
        if not cand:
            return 0, []
        p = self.redis.pipeline(transaction=False)
        p.hmget(k.meta, cand)
        p.zmscore(k.order, cand)
        metas, seqs = p.execute()
        rows = []
        for item, m, seq in zip(cand, metas, seqs, strict=True):
            if m is None or seq is None:
                continue
            ins, reward, actor = _s(m).split("|", 2)
            r = float(reward)
            if min_reward is not None and r < min_reward or max_reward is not None and r > max_reward:
                continue
            if actor_id is not None and actor != actor_id:
                continue
            rows.append((seq, item, float(ins)))
        rows.sort()
        page = rows[offset:offset + limit]
        out = []
        for _, item, ins in page:
            got = self.get(item)
            if got is not None:
                out.append((item, got[0], {**got[1], "inserted_at": ins}))
        return len(rows), out

    def page(
        self,
        *,
        cursor: int = 0,
        limit: int = 50,
        min_version: int | None = None,
        max_version: int | None = None,
        min_reward: float | None = None,
        max_reward: float | None = None,
        actor_id: str | None = None,
        leased: bool | None = None,
        min_times_sampled: int | None = None,
    ) -> tuple[list[tuple[str, Trajectory, dict[str, Any]]], int | None]:
        """Up to `limit` stored items matching the filters, in insertion order after `cursor` (0 = from the
        start): ([(id, trajectory, meta)], next cursor or None at the end). Bounded work per call: at most
        PAGE_SCAN items are examined, so a sparse filter may return a short (even empty) page with a cursor."""
        if limit < 1 or cursor < 0:
            raise ValueError(f"limit={limit} must be >= 1 and cursor={cursor} >= 0")
        k = self.keys
        out: list[tuple[str, Trajectory, dict[str, Any]]] = []
        scanned = 0
        while len(out) < limit and scanned < PAGE_SCAN:
            chunk = self.redis.zrangebyscore(k.order, f"({cursor}", "+inf", start=0, num=min(500, PAGE_SCAN),
                                             withscores=True)
            if not chunk:
                return out, None
            ids = [_s(i) for i, _ in chunk]
            p = self.redis.pipeline(transaction=False)
            for key in (k.meta, k.handed, k.lease_of):
                p.hmget(key, ids)
            p.zmscore(k.byver, ids)
            metas, handed, owners, vers = p.execute()
            for (item, seq), m, h, owner, v in zip(chunk, metas, handed, owners, vers, strict=True):
                cursor, scanned = int(seq), scanned + 1
                if m is None or v is None:
                    continue
                ins, reward, actor = _s(m).split("|", 2)
                r, ver = float(reward), int(v)
                if (min_version is not None and ver < min_version or max_version is not None and ver > max_version
                        or min_reward is not None and r < min_reward or max_reward is not None and r > max_reward
                        or actor_id is not None and actor != actor_id
                        or leased is not None and (owner is not None) != leased
                        or min_times_sampled is not None and int(h or 0) < min_times_sampled):
                    continue
                got = self.get(_s(item))
                if got is not None:
                    out.append((_s(item), got[0], {**got[1], "inserted_at": float(ins)}))
                if len(out) >= limit:
                    break
        return out, cursor

    def get(self, item_id: str) -> tuple[Trajectory, dict[str, Any]] | None:
        """One stored item and its bookkeeping, or None."""
        k = self.keys
        p = self.redis.pipeline(transaction=False)
        for key in (k.items, k.refs, k.handed, k.acked, k.prio, k.lease_of):
            p.hget(key, item_id)
        payload, ref, handed, acked, prio, lease = p.execute()
        if payload is None:
            return None
        return codec.decode(payload, ref or None), {
            "times_sampled": int(handed or 0), "times_acked": int(acked or 0),
            "priority": _f(prio) if prio is not None else 1.0, "leased": lease is not None,
        }

    def size(self) -> int:
        return int(self.redis.zcard(self.keys.order))
