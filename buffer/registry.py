"""Actor registry (heartbeats with a TTL), the latest-weights record and the learner status record."""

from __future__ import annotations

from typing import Any

import redis as redis_lib

from buffer import keys
from buffer.schema import ActorInfo, LearnerStatus, WeightsInfo

_SET_WEIGHTS = """
-- KEYS[1] weights:latest; ARGV[1] WeightsInfo JSON, ARGV[2] its version.
-- Versions only increase: an older record never overwrites a newer one. Returns 1 if stored.
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cjson.decode(cur).version) > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


_HEARTBEAT = """
-- KEYS[1] actors, KEYS[2] actors:exp; ARGV[1] actor id, [2] ActorInfo JSON, [3] expiry (unix s).
-- Only a registered actor is refreshed: a heartbeat racing a deregister never brings the actor back.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

_PRUNE = """
-- KEYS[1] actors, KEYS[2] actors:exp; ARGV[1] expiry cut-off (unix s), [2] most actors removed per call.
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #dead > 0 then
  redis.call('HDEL', KEYS[1], unpack(dead))
  redis.call('ZREM', KEYS[2], unpack(dead))
end
return #dead
"""

PRUNE_AFTER_S = 3600.0
"""A registered actor whose heartbeat expired this long ago is forgotten (pruned on register and listing)."""


def _server_time(r: redis_lib.Redis) -> float:
    s, us = r.time()
    return s + us / 1e6


class ActorRegistry:
    """actor_id -> ActorInfo; an actor is live while its last heartbeat is younger than its ttl_s.

    Times are the Redis server's clock, so hosts with skewed clocks agree on liveness.
    """

    def __init__(self, redis: redis_lib.Redis) -> None:
        self.redis = redis
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._prune = redis.register_script(_PRUNE)

    def register(self, info: ActorInfo, ttl_s: float = 15.0) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s={ttl_s} must be > 0")
        now = _server_time(self.redis)
        info = info.model_copy(update={"last_heartbeat": now})
        p = self.redis.pipeline(transaction=True)
        p.hset(keys.ACTORS, info.actor_id, info.model_dump_json())
        p.zadd(keys.ACTORS_EXP, {info.actor_id: now + ttl_s})
        p.execute()
        self.prune()

    def heartbeat(self, actor_id: str, ttl_s: float = 15.0, **fields: Any) -> None:
        """Refresh liveness and update ActorInfo fields (e.g. policy_version, tokens_per_s)."""
        if not ttl_s > 0:
            raise ValueError(f"ttl_s={ttl_s} must be > 0")
        raw = self.redis.hget(keys.ACTORS, actor_id)
        if raw is None:
            raise KeyError(f"actor {actor_id!r} is not registered (or was deregistered): call register() first")
        now = _server_time(self.redis)
        data = ActorInfo.model_validate_json(raw).model_dump()
        unknown = set(fields) - set(data)
        if unknown:
            raise ValueError(f"unknown ActorInfo fields {sorted(unknown)}")
        info = ActorInfo.model_validate({**data, **fields, "last_heartbeat": now})
        if not self._heartbeat(keys=[keys.ACTORS, keys.ACTORS_EXP],
                               args=[actor_id, info.model_dump_json(), repr(now + ttl_s)]):
            raise KeyError(f"actor {actor_id!r} was deregistered meanwhile: call register() first")

    def prune(self, older_than_s: float = PRUNE_AFTER_S, limit: int = 1000) -> int:
        """Forget actors whose heartbeat expired more than `older_than_s` ago (at most `limit` per call)."""
        cut = _server_time(self.redis) - older_than_s
        return int(self._prune(keys=[keys.ACTORS, keys.ACTORS_EXP], args=[repr(cut), limit]))

    def live(self) -> list[ActorInfo]:
        now = _server_time(self.redis)
        ids = self.redis.zrangebyscore(keys.ACTORS_EXP, now, "+inf")
        if not ids:
            return []
        return [ActorInfo.model_validate_json(r) for r in self.redis.hmget(keys.ACTORS, ids) if r is not None]

    def all(self) -> list[tuple[ActorInfo, bool]]:
        """Every registered actor with its liveness (dead ones stay listed until pruned, PRUNE_AFTER_S)."""
        self.prune()
        now = _server_time(self.redis)
        exp = {k.decode() if isinstance(k, bytes) else k: v
               for k, v in self.redis.zrange(keys.ACTORS_EXP, 0, -1, withscores=True)}
        out = []
        for aid, raw in self.redis.hgetall(keys.ACTORS).items():
            a = aid.decode() if isinstance(aid, bytes) else aid
            out.append((ActorInfo.model_validate_json(raw), exp.get(a, 0.0) > now))
        return sorted(out, key=lambda x: x[0].actor_id)

    def deregister(self, actor_id: str) -> None:
        p = self.redis.pipeline(transaction=True)
        p.hdel(keys.ACTORS, actor_id)
        p.zrem(keys.ACTORS_EXP, actor_id)
        p.execute()


class WeightsStore:
    """The newest published weights (version, sha256, path); versions only move forward."""

    def __init__(self, redis: redis_lib.Redis) -> None:
        self.redis = redis
        self._set = redis.register_script(_SET_WEIGHTS)

    def set_latest(self, info: WeightsInfo) -> None:
        self._set(keys=[keys.WEIGHTS_LATEST], args=[info.model_dump_json(), info.version])

    def latest(self) -> WeightsInfo | None:
        raw = self.redis.get(keys.WEIGHTS_LATEST)
        return None if raw is None else WeightsInfo.model_validate_json(raw)


class LearnerStatusStore:
    """The learner's latest status record (step, policy version, metrics)."""

    def __init__(self, redis: redis_lib.Redis) -> None:
        self.redis = redis

    def set(self, status: LearnerStatus) -> None:
        self.redis.set(keys.LEARNER_STATUS, status.model_dump_json())

    def get(self) -> LearnerStatus | None:
        raw = self.redis.get(keys.LEARNER_STATUS)
        return None if raw is None else LearnerStatus.model_validate_json(raw)
