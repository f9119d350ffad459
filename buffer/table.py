"""ReplayTable: a Reverb-style replay table over Redis, every change one Lua script (buffer/lua/).

Vocabulary (Reverb's). Let N = items stored, I = items ever inserted, S = items ever handed out by `sample`.

- ``max_size``: before an insert of m new items the fifo remover evicts the N + m - max_size items with the
  lowest insertion sequence (leased or not; counter ``removed``), so N <= max_size always.
- samplers (B = batch size, A = available items, i.e. stored and not leased; draws without replacement):
  ``fifo`` takes the B available items with the lowest insertion sequence (probability reported 1), ``lifo``
  those with the highest (an acked item that may be sampled again is replayed before anything older);
  ``uniform`` takes a uniformly random B-subset of the A available items (reported P = B / A, the inclusion
  probability); ``prioritized`` draws one at a time with P(i) = p_i^alpha / sum_{j available} p_j^alpha
  (sum tree; p_i is given at insert or by `update_priorities`; an item inserted without one enters at the
  largest priority ever set in the table, 1.0 before any, so each new item is likely seen at least once, as in
  prioritized experience replay; if every available p_j is 0 it falls back to uniform). Leased items carry no
  probability mass. `update_priorities` of a whole batch is one script; the sum tree is updated level by level.
- ``max_times_sampled`` = m > 0: an item is removed once it has been **acked** m times (counter ``consumed``).
  While leased it is not sampleable, so with m = 1 no item is trained twice (unless its lease expired first)
  and none is lost. m = 0: never removed by sampling.
- books: ``inserts`` = size + ``consumed`` (acked ``max_times_sampled`` times) + ``removed`` (fifo remover) +
  ``dropped_stale``; ``removed_unsampled`` counts the removed/dropped items that were never handed out by
  `sample` ("never trained"), ``sampled_distinct`` the items handed out at least once; ``samples`` counts
  hand-outs (so samples / inserts is the reuse ratio). `reset` clears the books with the contents.
- ``max_staleness_versions`` = s (None: no staleness drop): at sample time every available item with learner_version - policy_version > s
  is dropped (counter ``dropped_stale``); SampleInfo.age_versions = learner_version - policy_version.
- rate limiter (Reverb's SampleToInsertRatio with spi = samples_per_insert, e = error_buffer, m0 =
  min_size_to_sample): diff = I * spi - S', min_diff = spi * m0 - e, max_diff = spi * m0 + e, where S' counts
  handed-out items plus, for each item that leaves the table, max(0, spi - times it was handed out) (so
  evictions and drops cannot deadlock the two sides).
  ``insert`` of k items proceeds while I + k <= m0 or diff + k * spi <= max_diff (or the table is empty);
  ``sample`` of B items proceeds when N >= m0, A >= B and diff - B >= min_diff (without spi: N >= m0, A >= B).
  Both sides block (poll with backoff) up to ``timeout_s`` and then raise `RateLimitTimeout`; an operator
  pause (`pause("sampling"|"inserts")`) blocks the same way. Blocked inserts wait in line: the room the sampler
  frees goes to the insert calls in the order the limiter first refused them (zset ``waiters``; a call not seen
  for a second leaves it), so many actors share a rate-limited table instead of the fastest poller taking it all.
  No deadlock needs max_diff - spi >= min_diff + B, i.e. e >= (spi + B) / 2: checked, ValueError otherwise.
- lease: `sample` leases its items until now + lease_s (server clock); `ack` after the optimizer step; an
  expired lease returns its items to the pool (reclaimed inside every insert/sample/ack script, no background
  thread) and acking it afterwards acks nothing; `renew` extends leases that have not expired yet.
  SampleInfo.times_sampled counts hand-outs, this one included.
- insert is idempotent per id (item id = traj_id) for an item's whole life: an id stored now, or among the
  newest ``remember_removed_ids`` removed ones (consumed, evicted, dropped; zset ``gone``), is a duplicate, so
  a retried insert never brings back a trained trajectory. A partial admission says which ids got in
  (`InsertResult`, `InsertTimeout.result`); a repeated id within one call is a duplicate of its first copy.
- a sample's lease id is its request id: re-sending a sample with the id of a live lease replays that lease.
- memory guard: inserts wait (then `BufferFull`) while Redis used_memory >= ``memory_limit_bytes`` (default 90%
  of Redis's maxmemory when set); a write Redis refuses for maxmemory (OOM) raises `BufferFull` at once.

The config is stored in Redis on first use; a later user with a different config gets `TableConfigMismatch`
(a ValueError) naming the differing fields. `ReplayTable(redis)` with no config adopts the stored one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import uuid
from importlib import resources
from typing import Any

import msgpack
import redis as redis_lib

from buffer import codec, columns, resp
from buffer.columns import ColumnBatch
from buffer.keys import TableKeys
from buffer.schema import SampleBatch, TableConfig, Trajectory
from buffer.table_types import (  # noqa: F401  (re-exported: buffer.table is where callers import them)
    LEASE_ARG,
    RENEW_ARG,
    BufferFull,
    EncodedBatch,
    InsertResult,
    InsertTimeout,
    RateLimitTimeout,
    Row,
    TableConfigMismatch,
    _f,
    _s,
)
from buffer.table_views import TableViews

log = logging.getLogger(__name__)


MAX_STALE_DROP = 10_000
"""Most stale items one sample call drops (the rest go in later calls): bounds the work of a version jump."""
_MEMORY_CHECK_S = 0.5
"""Each client reads Redis's INFO memory at most this often while inserting."""
INSERT_POLL_MAX_S = 0.02
"""Longest pause between the polls of a held-back insert (each pause drawn from [p/2, p], p doubling from 2 ms)."""


def _lease_ids(lease_ids: list[str]) -> list[str]:
    ids = list(lease_ids)
    if not all(isinstance(x, str) and x for x in ids):
        raise ValueError("lease ids must be non-empty strings")
    return ids


def _lua(name: str) -> str:
    return resources.files("buffer").joinpath("lua", name).read_text()


def _script_source(body: str) -> str:
    mapping = ", ".join(f"{f} = KEYS[{i + 1}]" for i, f in enumerate(TableKeys.FIELDS))
    return f"local K = {{{mapping}}}\n" + _lua("table_common.lua") + "\n" + _lua(body)


_SOURCES = {
    "insert": _script_source("table_insert.lua"),
    "sample": _script_source("table_sample.lua"),
    "ack": _script_source("table_ack.lua"),
    "update": _script_source("table_update.lua"),
}


class ReplayTable(TableViews):
    """A replay table shared by every actor and learner process that opens it with the same TableConfig."""

    def __init__(self, redis: redis_lib.Redis, config: TableConfig | None = None, *, name: str | None = None):
        self.redis = redis
        self.keys = TableKeys(name or (config.name if config else "replay"))
        if config is not None:
            self._check_config(config)
        self.config = self._adopt_config(config)
        # redis-py Script objects: EVALSHA, re-sent once if the server lost its script cache (restart).
        self._scripts = {k: redis.register_script(src) for k, src in _SOURCES.items()}
        # Precomputed once, as bytes (redis-py passes bytes through unchanged): the config never changes for the
        # lifetime of a table.
        self._keys_all = [k.encode() for k in self.keys.all()]
        self._nkeys = len(self._keys_all)
        self._hdr = [str(x).encode() for x in self._header()]
        self._hset_item = resp.Prefix("HSET", self.keys.items)
        self._hmget_items, self._hmget_refs = resp.Prefix("HMGET", self.keys.items), resp.Prefix("HMGET", self.keys.refs)
        self._evalsha = {k: resp.Prefix("EVALSHA", s.sha, self._nkeys, *self._keys_all, *self._hdr)
                         for k, s in self._scripts.items()}
        self._blocked = False  # the last insert was held back: probe before sending payloads
        self._mem_checked = -1e9
        self._mem_state: tuple[int, int | None] = (0, None)
        self._rng = random.SystemRandom()

    @classmethod
    def from_url(cls, url: str, config: TableConfig | None = None) -> ReplayTable:
        from buffer.client import connect  # client imports this module

        return cls(connect(url), config)

    # ---- configuration ----

    @staticmethod
    def config_key(name: str) -> str:
        """Redis key of a table's stored config (to test whether a table exists)."""
        return TableKeys(name).config

    def _adopt_config(self, config: TableConfig | None) -> TableConfig:
        stored = self.redis.get(self.keys.config)
        if stored is None:
            cfg = config or TableConfig(name=self.keys.name)
            if cfg.name != self.keys.name:
                raise ValueError(f"config.name {cfg.name!r} does not match the table name {self.keys.name!r}")
            if self.redis.set(self.keys.config, cfg.model_dump_json(), nx=True):
                return cfg
            stored = self.redis.get(self.keys.config)  # another process won the race
        existing = TableConfig.model_validate_json(stored)
        if config is not None and config.model_dump() != existing.model_dump():
            a, b = existing.model_dump(), config.model_dump()
            diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
            raise TableConfigMismatch(
                f"table {self.keys.name!r} exists with a different config (stored, given): {diff}; "
                "use the run TOML's [buffer] table config everywhere, or reset the table with "
                "ReplayTable.drop() / POST /v1/admin/reset with drop_config=true"
            )
        return existing

    @staticmethod
    def _check_config(cfg: TableConfig) -> None:
        rl = cfg.rate_limiter
        if rl.samples_per_insert is not None and rl.error_buffer < max(1.0, rl.samples_per_insert):
            raise ValueError(
                f"rate_limiter.error_buffer={rl.error_buffer} is too small for samples_per_insert="
                f"{rl.samples_per_insert}: it must be >= max(1, samples_per_insert) (else neither side can move)"
            )
        if rl.min_size_to_sample > cfg.max_size:
            raise ValueError(
                f"rate_limiter.min_size_to_sample={rl.min_size_to_sample} exceeds max_size={cfg.max_size}"
            )

    def _header(self) -> list[Any]:
        c = self.config
        rl = c.rate_limiter
        return [
            c.sampler.kind,
            repr(float(getattr(c.sampler, "exponent", 1.0))),
            "" if rl.samples_per_insert is None else repr(float(rl.samples_per_insert)),
            repr(float(rl.error_buffer)),
            rl.min_size_to_sample,
            c.max_size,
            c.max_times_sampled,
            c.remember_removed_ids,
        ]

    def _run(self, script: str, args: list[Any]) -> Any:
        return self._scripts[script](keys=self._keys_all, args=self._hdr + args)

    # ---- insert ----

    def insert(
        self,
        trajectories: list[Trajectory],
        timeout_s: float | None = 30.0,
        priorities: list[float] | None = None,
    ) -> list[str]:
        """Insert trajectories (item id = traj_id); returns the ids of `trajectories`, admitted or duplicate.

        Idempotent per id for an item's whole life: an id stored now, or removed (consumed, evicted, dropped)
        within the last `remember_removed_ids` removals, is not stored again, so retrying a whole list is safe.
        Blocks while inserts are paused or the rate limiter holds the actors back; raises `InsertTimeout` (a
        `RateLimitTimeout`) after `timeout_s` (None = wait forever), whose `.result` says which ids got in.
        `insert_batch` returns that `InsertResult` directly; `encode_batch` + `insert_encoded` encode once for
        several tries.
        """
        self.insert_batch(trajectories, timeout_s, priorities)
        return [t.traj_id for t in trajectories]

    def insert_batch(
        self,
        trajectories: list[Trajectory],
        timeout_s: float | None = 30.0,
        priorities: list[float] | None = None,
    ) -> InsertResult:
        """`insert`, answering which ids were stored now and which were duplicates (see `InsertResult`)."""
        _check_timeout(timeout_s)
        return self.insert_encoded(self.encode_batch(trajectories, priorities), timeout_s)

    def insert_encoded(self, batch: EncodedBatch, timeout_s: float | None = 30.0) -> InsertResult:
        """`insert_batch` of trajectories already encoded by `encode_batch` (may be sent again: idempotent)."""
        _check_timeout(timeout_s)
        result = InsertResult(duplicates=list(batch.repeated))
        self._insert_rows(batch.rows, result, timeout_s)
        return result

    def encode_batch(self, trajectories: list[Trajectory], priorities: list[float] | None = None) -> EncodedBatch:
        """Validate and encode trajectories for `insert_encoded`. Encoding is most of an insert's client time
        (`make bench-buffer`): a caller that retries an insert (rate limiter, Redis restart) encodes once."""
        if priorities is not None and len(priorities) != len(trajectories):
            raise ValueError(f"priorities has {len(priorities)} entries for {len(trajectories)} trajectories")
        for p in priorities or []:
            if not p >= 0 or p == float("inf"):
                raise ValueError(f"priority {p} must be a finite number >= 0")
        batch = EncodedBatch()
        seen: set[str] = set()
        storage = self.config.storage
        for i, t in enumerate(trajectories):
            if not isinstance(t, Trajectory):
                raise ValueError(f"insert expects Trajectory objects, got {type(t).__name__}")
            if t.traj_id in seen:  # a repeated id in one call is a duplicate: its payload is not sent again
                batch.repeated.append(t.traj_id)
                continue
            seen.add(t.traj_id)
            batch.rows.append((t.traj_id, codec.encode(t, storage), [
                t.traj_id, t.policy_version, repr(float(t.reward)), t.actor_id,
                repr(float(priorities[i])) if priorities else ""]))
        return batch

    def _insert_rows(self, rows: list[Row], result: InsertResult, timeout_s: float | None) -> None:
        call = uuid.uuid4().hex  # this call's place in the line of blocked inserters (table_common.lua, wait_line)
        try:
            self._insert_until_admitted(rows, result, timeout_s, call)
        except BaseException:
            if self._blocked:  # refused last: leave the line now rather than hold the others back for a second
                with contextlib.suppress(redis_lib.RedisError):
                    self._run("update", ["leave", call])
            raise

    def _insert_until_admitted(self, rows: list[Row], result: InsertResult, timeout_s: float | None, call: str
                               ) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pause = 0.002
        chunk = min(500, self.config.max_size)  # the script evicts at most its own size; bounded requests
        while rows:
            n = min(len(rows), chunk)
            status = "ok"
            if not self._memory_ok():
                status, n = "memory", 0
            elif self._blocked:
                # Held back lately: ask first (metadata only), then send only the payloads that will get in.
                status, allowed = (_s(x) for x in self._run("update", ["probe", n, call, len(rows)]))
                n = min(n, int(allowed))
            if n > 0:
                status, flags = self._insert_chunk(rows[:n], call, len(rows))
                rest = []
                for row, flag in zip(rows[:n], flags, strict=True):
                    if flag == "N":
                        result.admitted.append(row[0])
                    elif flag == "D":
                        result.duplicates.append(row[0])
                    else:
                        rest.append(row)
                rows = rest + rows[n:]
            self._blocked = status != "ok"
            if status == "ok":
                pause = 0.002
                continue
            if deadline is not None and time.monotonic() >= deadline:
                result.pending = [row[0] for row in rows]
                raise self._not_admitted(status, len(rows), result, timeout_s)
            # Jittered, and capped well below the second after which a call that stopped polling leaves the line.
            wait = self._rng.uniform(pause / 2, pause)
            time.sleep(wait if deadline is None else min(wait, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, INSERT_POLL_MAX_S)

    def _not_admitted(self, status: str, pending: int, result: InsertResult, timeout_s: float | None) -> Exception:
        if status == "memory":
            used, limit = self._mem_state
            return BufferFull(
                f"insert into {self.keys.name!r} refused after {timeout_s}s: Redis uses {used:,} bytes, at the "
                f"memory guard of {limit:,} bytes (memory_limit_bytes / 90% of maxmemory); let the learner consume, "
                "lower max_size, or give Redis more memory", result)
        why = "inserts paused by an operator" if status == "paused" else "rate limiter"
        return InsertTimeout(
            f"insert into {self.keys.name!r}: {pending} of {pending + len(result.admitted)} items not admitted after "
            f"{timeout_s}s ({why}); .result lists the admitted and pending ids", result)

    def _memory_ok(self) -> bool:
        """False while Redis's used_memory is at or above the guard (read at most every _MEMORY_CHECK_S)."""
        now = time.monotonic()
        if now - self._mem_checked >= _MEMORY_CHECK_S:
            info = self.redis.info("memory")
            maxmemory = int(info.get("maxmemory", 0) or 0)
            limit = self.config.memory_limit_bytes or (int(0.9 * maxmemory) if maxmemory else None)
            self._mem_state = (int(info["used_memory"]), limit)
            self._mem_checked = now
        used, limit = self._mem_state
        return limit is None or used < limit

    def _oom(self, e: Exception) -> Exception:
        if isinstance(e, redis_lib.exceptions.OutOfMemoryError) or "OOM" in str(e) or "maxmemory" in str(e):
            return BufferFull(f"Redis refused the insert into {self.keys.name!r}: {e}; set memory_limit_bytes "
                              "below Redis's maxmemory so inserts wait instead", InsertResult())
        return e

    def _insert_chunk(self, rows: list[Row], call: str, wanting: int) -> tuple[str, str]:
        """MULTI { HSET items id payload (each) ; EVALSHA insert(metadata) } -> (status, flag per row); `call`
        wants `wanting` items in all, these rows included."""
        # the 5 metadata values per row as one msgpack argument: 160 arguments cost more to send (and Redis more to
        # parse) than one array costs cmsgpack to unpack in the script
        meta = msgpack.packb([x for _, _, m in rows for x in m])
        request = [resp.MULTI]
        for item_id, payload, _ in rows:  # one HSET per item: a single 500 KB command parses ~2x slower
            self._hset_item.add(request, item_id, payload)
        self._evalsha["insert"].add(request, len(rows), meta, call, wanting)
        request.append(resp.EXEC)
        for attempt in range(2):
            out = resp.roundtrip(self.redis, request, len(rows) + 3)
            res = out[-1]
            if isinstance(res, redis_lib.exceptions.ResponseError):  # EXECABORT: a queued command was refused
                raise self._oom(next(x for x in out if isinstance(x, Exception)))
            res = res[-1]
            if isinstance(res, redis_lib.exceptions.NoScriptError) and attempt == 0:
                # Server restarted and lost its script cache: load and redo the whole (idempotent) transaction.
                self._scripts["insert"].sha = self.redis.script_load(self._scripts["insert"].script)
                continue
            if isinstance(res, Exception):
                raise self._oom(res) if isinstance(res, redis_lib.exceptions.ResponseError) else res
            return _s(res[0]), _s(res[1])
        raise RuntimeError("unreachable")

    # ---- sample / ack ----

    def sample(self, batch_size: int, learner_version: int, timeout_s: float | None = 30.0, *,
               lease_s: float | None = None, request_id: str | None = None, ack: list[str] | None = None,
               ) -> SampleBatch:
        """Lease `batch_size` items (all or nothing); see the module docstring for who gets picked.

        Blocks until the table can serve the batch; raises `RateLimitTimeout` after `timeout_s`.
        `request_id` (default: a fresh one) becomes the lease id: calling again with the id of a live lease
        returns that lease's items still held instead of leasing more, so a caller that retries after a lost
        reply strands nothing (redis-py's own retries of the call are covered the same way).
        `ack`: lease ids acked in full by the same script before sampling (saves the ack's round trip).
        """
        return self.sample_columns(batch_size, learner_version, timeout_s, lease_s=lease_s, request_id=request_id,
                                   ack=ack).to_sample_batch()

    def sample_columns(self, batch_size: int, learner_version: int, timeout_s: float | None = 30.0, *,
                       lease_s: float | None = None, request_id: str | None = None, ack: list[str] | None = None,
                       ) -> ColumnBatch:
        """`sample` as a `ColumnBatch`: numpy columns and zero-copy token views, Trajectory objects on demand."""
        args = self.sample_args(batch_size, learner_version, lease_s, request_id, ack)
        res = self.lease_batch(args, timeout_s)
        return self.fetch_batch(res, args[LEASE_ARG], learner_version)

    def sample_args(self, batch_size: int, learner_version: int, lease_s: float | None = None,
                    request_id: str | None = None, ack: list[str] | None = None, renew: str | None = None,
                    ) -> list[Any]:
        """Validated arguments of the sample script (the lease id is args[LEASE_ARG]; `renew`: a lease the script renews
        to now + lease_s first, if it has not expired; `ack`: leases it acks in full before sampling)."""
        if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 200):
            raise ValueError(f"request_id={request_id!r} must be a string of 1-200 characters")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        if batch_size > self.config.max_size:
            raise ValueError(f"batch_size={batch_size} exceeds the table's max_size={self.config.max_size}")
        if not isinstance(learner_version, int) or learner_version < 0:
            raise ValueError(f"learner_version={learner_version!r} must be an integer >= 0")
        lease = self.config.lease_s if lease_s is None else lease_s
        if not lease > 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        if not all(isinstance(x, str) and x for x in ack or []):
            raise ValueError("ack must be a list of lease ids (non-empty strings)")
        if renew is not None and not (isinstance(renew, str) and renew):
            raise ValueError(f"renew={renew!r} must be a lease id (a non-empty string)")
        rl = self.config.rate_limiter
        if rl.samples_per_insert is not None and 2 * rl.error_buffer < rl.samples_per_insert + batch_size:
            raise ValueError(
                f"batch_size={batch_size} cannot be served with samples_per_insert={rl.samples_per_insert} and "
                f"error_buffer={rl.error_buffer}: needs error_buffer >= (samples_per_insert + batch_size) / 2"
            )
        max_st = -1 if self.config.max_staleness_versions is None else self.config.max_staleness_versions
        return [batch_size, learner_version, max_st, request_id or uuid.uuid4().hex, repr(float(lease)),
                self._rng.randrange(1, 2**31 - 1), MAX_STALE_DROP, renew or "", *(ack or [])]

    def lease_batch(self, args: list[Any], timeout_s: float | None) -> list[Any]:
        """Run the sample script until it leases (polling with backoff); its 'ok' reply."""
        _check_timeout(timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pause = 0.002
        while True:
            res = self._run("sample", args)
            status = _s(res[0])
            if status == "ok":
                return res
            if deadline is not None and time.monotonic() >= deadline:
                rl = self.config.rate_limiter
                why = {"paused": "sampling paused by an operator", "rate": "rate limiter (learner ahead of actors)",
                       "min_size": f"fewer than min_size_to_sample={rl.min_size_to_sample} items",
                       "empty": f"fewer than batch_size={args[0]} available items"}.get(status, status)
                raise RateLimitTimeout(
                    f"sample from {self.keys.name!r} timed out after {timeout_s}s: {why} "
                    f"(size {int(res[1])}, available {int(res[2])})"
                )
            args[RENEW_ARG:] = [""]  # the lease to renew and those to ack were done by the first call
            time.sleep(pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.05)

    def fetch_batch(self, res: list[Any], lease_id: str, learner_version: int) -> ColumnBatch:
        """Payloads and cached references of a leased batch (one round trip) -> ColumnBatch."""
        ids = res[8:]
        if not ids:  # a replayed lease whose items were all acked meanwhile
            return self.columns(res, lease_id, learner_version, [], [])
        p = self.redis.pipeline(transaction=False)
        p.execute_command("HMGET", self.keys.items, *ids)
        if int(res[6]) == 1:  # the table holds cached references
            p.execute_command("HMGET", self.keys.refs, *ids)
        payloads, *refs = p.execute()
        return self.columns(res, lease_id, learner_version, payloads, refs[0] if refs else [None] * len(ids))

    def columns(self, res: list[Any], lease_id: str, learner_version: int, payloads: list[Any],
                refs: list[Any]) -> ColumnBatch:
        batch, dropped = columns.build(res, lease_id, learner_version, payloads, refs)
        for item_id in dropped:
            log.warning("item %s was evicted while being sampled; dropped from the batch", item_id)
        return batch

    def ack(self, lease_id: str, item_ids: list[str] | None = None) -> int:
        """Acknowledge (all or some) items of a lease; returns how many were still held by it and got acked."""
        if not isinstance(lease_id, str) or not lease_id:
            raise ValueError(f"lease_id={lease_id!r} must be a non-empty string")
        arg = "*" if item_ids is None else json.dumps(list(item_ids))
        return int(self._run("ack", [lease_id, arg]))

    def renew(self, lease_ids: list[str], lease_s: float | None = None) -> int:
        """Extend leases that have not expired yet to now + lease_s (server clock); returns how many were renewed.

        A learner that acks only once a checkpoint covers its updates holds several leases at once and renews
        them; a lease that expired before its renewal is not revived (its items are already back in the pool).
        """
        args = self.renew_args(lease_ids, lease_s)
        return int(self._run("update", args)) if len(args) > 2 else 0

    def renew_args(self, lease_ids: list[str], lease_s: float | None = None) -> list[Any]:
        """Validated arguments of `renew` for the update script."""
        lease = self.config.lease_s if lease_s is None else lease_s
        if not lease > 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        return ["renew", repr(float(lease)), *_lease_ids(lease_ids)]

    def release(self, lease_ids: list[str]) -> int:
        """End leases now without acking them: their items return to the pool at once (as if expired, and counted
        with the expired lease items). For a batch leased but never trained, e.g. a prefetched one at shutdown;
        returns how many items came back."""
        ids = _lease_ids(lease_ids)
        return int(self._run("update", ["release", *ids])) if ids else 0

    # ---- maintenance ----

    def update_priorities(self, priorities: dict[str, float]) -> None:
        """Set p_i for the given items (missing ids are ignored: they may have been consumed meanwhile)."""
        args = self.priority_args(priorities)
        if len(args) > 1:
            self._run("update", args)

    def priority_args(self, priorities: dict[str, float]) -> list[Any]:
        """Validated arguments of `update_priorities` for the update script."""
        args: list[Any] = ["prio"]
        for item_id, p in priorities.items():
            if not isinstance(p, int | float) or not p >= 0 or p == float("inf"):
                raise ValueError(f"priority {p!r} of item {item_id!r} must be a finite number >= 0")
            args += [item_id, repr(float(p))]
        return args

    def cache_reference(self, item_id: str, ref_logprobs: list[float], ref_v0: float | None = None) -> None:
        """Store reference log-probs with the item so every later sample carries them (see `cache_references`)."""
        self.cache_references({item_id: (ref_logprobs, ref_v0)})

    def cache_references(self, refs: dict[str, tuple[Any, float | None]]) -> int:
        """Cache reference log-probs (a list or float array each) and V_ref(s_1) of many items in one call;
        returns how many were stored. Skipped for items gone meanwhile and for leased items whose ack will remove
        them (times acked + 1 >= max_times_sampled: the cached value would never be read)."""
        return int(self._run("update", self.reference_args(refs))) if refs else 0

    @staticmethod
    def reference_args(refs: dict[str, tuple[Any, float | None]]) -> list[Any]:
        """Arguments of `cache_references` for the update script."""
        args: list[Any] = ["ref"]
        for item_id, (logprobs, v0) in refs.items():
            args += [item_id, codec.encode_ref(list(logprobs), v0)]
        return args

    def reclaim_expired(self) -> int:
        """Return expired leases' items now (also done inside every insert/sample/ack)."""
        return int(self._run("update", ["reclaim"]))

    def reset(self) -> None:
        """Delete every item, lease and counter (the stored config stays). UNLINK: Redis frees the memory of
        large keys in a background thread instead of blocking every client."""
        self.redis.unlink(*self.keys.contents())

    def drop(self) -> None:
        """Delete the table including its stored config (UNLINK, as `reset`)."""
        self.redis.unlink(*self.keys.all())

    def pause(self, what: str) -> None:
        """Pause 'sampling' or 'inserts' (callers then block until resumed or their timeout)."""
        if what not in ("sampling", "inserts"):
            raise ValueError(f"what={what!r} must be 'sampling' or 'inserts'")
        self.redis.hset(self.keys.paused, what, "1")

    def resume(self, what: str) -> None:
        if what not in ("sampling", "inserts"):
            raise ValueError(f"what={what!r} must be 'sampling' or 'inserts'")
        self.redis.hdel(self.keys.paused, what)


def _check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s={timeout_s} must be >= 0 or None")
