"""Acks that wait for a checkpoint: a trajectory is consumed only once a checkpoint holds its update.

Why: the learner's optimizer step changes the model in memory; a crash before the next checkpoint rolls those
updates back. If the batch had been acked right after the step (with `max_times_sampled` = 1 it is then removed
from the buffer), a crash would lose up to `checkpoint_interval_steps` - 1 batches for good. Instead the learner
keeps the leases of the steps since its last checkpoint, renews them in the background so they do not expire,
and acks them right after the next checkpoint is written. After a crash the renewals stop, the leases expire and
their trajectories return to the buffer, so the resumed learner trains on them again: every acked trajectory's
update is in a checkpoint, and no trajectory is lost.

Cost: up to `checkpoint_interval_steps` x `batch_size` trajectories stay leased (not sampleable) between
checkpoints, plus the batch prefetched for the next step, which the table's `max_size` must leave room for.

Rank 0 of an async learner sends these acks and renewals through its `BatchStream` (learner/batch.py): the acks
released by a checkpoint, and the renewal of each newly held lease, go with the next step's single round trip (the
sample that leases the step after), so they lag the checkpoint by at most one sample and are never sent before it.

Redis errors (a restart, a failover) on the ack path are retried with back-off for up to `REDIS_RETRY_S`
(`redis_retry`), each retry logged, instead of crashing the learner: an ack that reached Redis before the error
acks nothing the second time (the lease is gone), so a retry never counts an item twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from buffer.client import BatchStream, ReplayTable

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_RETRY_S = 60.0
"""How long an ack (or a lease renewal) keeps retrying through Redis errors before it gives up and raises."""


def redis_retry(call: Callable[[], T], what: str, budget_s: float = REDIS_RETRY_S) -> T:
    """`call()`, retried on Redis connection errors and timeouts (back-off 0.2 s doubling to 5 s) for up to
    `budget_s` seconds; the last error is raised after that. Other errors are raised at once."""
    deadline = time.monotonic() + budget_s
    pause = 0.2
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() + pause > deadline:
                log.error("%s failed for %.0f s, giving up: %s", what, budget_s, e)
                raise
            log.warning("%s failed (%s); retrying in %.1f s", what, e, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


class PendingAcks:
    """Leases of trained but not yet checkpointed batches, kept alive by a renewal thread until `ack_all`."""

    def __init__(self, table: ReplayTable, lease_s: float, renew_every_s: float | None = None):
        self.table = table
        self.lease_s = lease_s
        self.renew_every_s = renew_every_s if renew_every_s is not None else lease_s / 4
        self._leases: list[str] = []
        self._items = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.expired = 0
        """Leases that expired before a renewal reached them (their items went back to the buffer)."""
        self._thread = threading.Thread(target=self._run, name="lease-renewal", daemon=True)
        self._thread.start()

    @property
    def pending_items(self) -> int:
        with self._lock:
            return self._items

    def add(self, leases: list[str], n_items: int, renew_now: bool = True) -> None:
        """Hold these leases (of `n_items` trained items) until the next `ack_all` / `release`. `renew_now`: give
        them a full term at once (a step can outlast a renewal period); False when the caller sends that renewal
        itself (rank 0's `BatchStream`, with the next step's round trip) and reports it to `renewed`."""
        with self._lock:
            self._leases += leases
            self._items += n_items
            if not renew_now:
                return
            try:  # the thread renews every renew_every_s, and retries this one then
                self._renew(list(leases))
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("renewing the new leases failed (retried by the renewal thread): %s", e)

    def renew(self) -> int:
        """Extend every held lease to now + lease_s; returns how many were still alive."""
        with self._lock:
            return self._renew(list(self._leases))

    def _renew(self, leases: list[str]) -> int:
        """Renew `leases` (caller holds the lock); count and log the ones that had expired."""
        if not leases:
            return 0
        alive = self.table.renew(leases, self.lease_s)
        self._count_expired(len(leases), alive)
        return alive

    def renewed(self, asked: int, alive: int) -> None:
        """A renewal sent by the caller (`add(renew_now=False)`) found `alive` of `asked` leases alive."""
        with self._lock:
            self._count_expired(asked, alive)

    def _count_expired(self, asked: int, alive: int) -> None:
        if alive < asked:
            self.expired += asked - alive
            log.warning(
                "%d of %d held leases expired before their renewal: their trajectories went back to the "
                "buffer and may be trained on twice (raise lease_s above the longest stall)", asked - alive, asked,
            )

    def release(self) -> tuple[list[str], int]:
        """Stop holding every lease (right after a checkpoint): (the leases, the items they hold), to be acked now
        by the caller (within lease_s: nobody renews them any more)."""
        with self._lock:
            leases, held = self._leases, self._items
            self._leases, self._items = [], 0
        return leases, held

    def ack_all(self) -> tuple[int, int]:
        """Ack every held lease (call right after a checkpoint); returns (items acked, items held)."""
        leases, held = self.release()
        return sum(ack_lease(self.table, lease) for lease in leases), held

    def close(self) -> None:
        """Stop renewing. Leases still held expire after lease_s and their items return to the buffer."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001  (Redis down: retried next period; the leases may expire)
                log.warning("lease renewal failed: %s", e)


def ack_lease(table: ReplayTable, lease_id: str, item_ids: list[str] | None = None) -> int:
    """`table.ack`, retried through Redis errors (`redis_retry`)."""
    return redis_retry(lambda: table.ack(lease_id, item_ids), f"ack of lease {lease_id}")


def renew_held(table: ReplayTable, leases: list[str], lease_s: float | None) -> int:
    """Renew leases a waiting learner holds (sync mode gathers a batch over several samples): retried through
    Redis errors; an expired one is logged (its items went back to the buffer). Returns how many were alive."""
    if not leases:
        return 0
    alive = redis_retry(lambda: table.renew(leases, lease_s), "renewal of held leases")
    if alive < len(leases):
        log.warning("%d of %d held leases expired while waiting for a batch: raise lease_s above sample_timeout_s",
                    len(leases) - alive, len(leases))
    return alive


def patient_redis(client: redis.Redis, attempts: int = 10) -> redis.Redis:
    """Let every call of the learner's Redis client ride out a Redis restart (~1-5 s: supervisor back-off plus
    the AOF load) instead of failing after the default 3 quick retries (`buffer.client.connect`). The table's
    scripts are safe to re-run (a retried sample is detected, acks and inserts are idempotent)."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    client.set_retry(Retry(ExponentialBackoff(cap=2.0, base=0.1), attempts))
    return client


def ack_checkpointed(pending: PendingAcks | None, stream: BatchStream | None = None) -> None:
    """After a checkpoint: ack the leases of every step it holds (rank 0; no-op without deferred acks). With a
    `stream` the acks go with its next round trip (the next step's sample, or its `close`), which warns if fewer
    items are acked than held."""
    if pending is None:
        return
    if stream is not None:
        stream.ack(*pending.release())
        return
    acked, held = pending.ack_all()
    if acked < held:
        # an expired lease (see PendingAcks.renew) or items evicted by max_size while leased
        log.warning("acked %d of %d checkpointed items; the rest expired or were evicted", acked, held)
