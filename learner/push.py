"""Push exported weights to every live actor without ever blocking the training loop (docs/weight-protocol.md).

`WeightPusher.sync(latest)` is cheap and called after every step: it reads the live actors from the registry and,
for each actor whose weights lag `latest.version` (by the registry's record and by what this pusher already
delivered) and that has no push in flight and no recent failure, submits `actor_service.client.push_weights` to a
thread pool. It does not wait. So

- a push to a slow or dead actor times out in its own thread (`push_timeout_s`) and is retried after
  `push_retry_s`; the loop never waits on it;
- an actor that joins late, or restarts (new `started_at`), lags the latest version and is caught up in the next
  `sync` call;
- an actor gets at most one push in flight; if several versions were exported meanwhile it gets the newest;
- an actor that answers 409 (it holds this version or a newer one) is booked as delivered only when it holds
  exactly this version (its answer names it; else the registry's record): its own catch-up or a timed-out push
  that landed, and a number always names the same weights.
  Otherwise, or when it reports a version above `latest`, it is ahead of this learner (weights of another lineage,
  e.g. a learner that restarted below the published version): not a delivery; `version_floor` records the newest
  version seen, the learner numbers its next weights above it (learner/checkpoints.py `next_version`) and the
  push after that lands.

Verified delivery: the exporter registers the learner's own log-probs of the canary sequence for each version
(`expect_canary`); an actor answers a push with its log-probs of the same sequence under the weights it applied.
The largest absolute difference is the actor's drift for that version (`canary_drift()`, `stats.canary_*`); above
`canary_max_drift` the push is logged as a warning and counted in `canary_alarms` (a silently corrupted apply,
e.g. a wrong tied head, or trainer/engine numerics that diverge).

Fan-out (`fanout`, docs/weight-protocol.md#fan-out): with more than two actors due ("auto") the learner sends the
file once, to the first of them, naming the others in `X-TBRM-Relay`; the actors stream it on down the chain while
receiving it and the first answers with every hop's answer. Each hop is booked like a direct push (200, 409); an
actor the chain did not deliver to (unreachable, refused, not listed) gets a direct push at once.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from buffer.schema import ActorInfo, WeightsInfo

log = logging.getLogger(__name__)

PushFn = Callable[..., Any]
Fanout = Literal["auto", "direct", "relay"]
"""direct: one push per actor; relay: one push to the first due actor, which relays it down the chain of the
others (actor_service.relay); auto: relay when more than two actors are due."""


@dataclass
class _ActorState:
    started_at: float
    delivered: int = -1
    """Newest version this pusher delivered to this incarnation of the actor."""
    refused: int = -1
    """Newest version this incarnation refused with 409 while holding another one (not pushed again; a newer
    version is pushed at once, without the failure back-off: the actor is alive and answering)."""
    in_flight: Future[Any] | None = None
    retry_at: float = 0.0
    failures: int = 0


@dataclass
class PushStats:
    pushes_ok: int = 0
    pushes_failed: int = 0
    last_latency_s: float = 0.0
    last_error: str = ""
    latencies_s: list[float] = field(default_factory=list)
    canary_alarms: int = 0
    """Pushes whose canary drift exceeded the threshold."""
    canary_drift_max: float = 0.0
    """Largest drift of the last push to each actor (max over actors)."""
    bytes_sent: int = 0
    """Body bytes this learner sent (one file per direct push, one per relayed chain)."""
    relay_pushes: int = 0
    """Relayed pushes (one body to the first actor of a chain)."""
    relay_fallbacks: int = 0
    """Actors of a chain the relay did not deliver to, then pushed directly."""


class WeightPusher:
    """Concurrent, non-blocking weight pushes with catch-up (see module docstring)."""

    def __init__(
        self,
        live_actors: Callable[[], list[ActorInfo]],
        token: str | None,
        timeout_s: float = 60.0,
        retry_s: float = 5.0,
        workers: int = 8,
        push_fn: PushFn | None = None,
        canary_max_drift: float = 0.05,
        fanout: Fanout = "auto",
    ) -> None:
        if push_fn is None:
            from actor_service.client import push_weights

            push_fn = push_weights
        self._push_fn = push_fn
        self._live = live_actors
        self._token = token or ""
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weight-push")
        self._actors: dict[str, _ActorState] = {}
        self._lock = threading.Lock()
        self.stats = PushStats()
        self.canary_max_drift = canary_max_drift
        if fanout not in get_args(Fanout):
            raise ValueError(f"fanout must be one of {get_args(Fanout)}, got {fanout!r}")
        self.fanout = fanout
        self._canary: dict[int, list[float]] = {}  # version -> the learner's canary log-probs (newest few)
        self._drift: dict[str, tuple[int, float]] = {}  # actor -> (version, drift) of its last push
        self.version_floor = 0
        """The newest version an actor was seen holding above what this learner pushed (409s, registry)."""

    def expect_canary(self, version: int, logprobs: list[float]) -> None:
        """The learner's canary log-probs for `version` (actors' answers are compared with them)."""
        with self._lock:
            self._canary[version] = logprobs
            for old in sorted(self._canary)[:-8]:
                del self._canary[old]

    def canary_drift(self) -> dict[str, dict[str, float]]:
        """{actor_id: {"version", "drift"}} of each actor's last verified push."""
        with self._lock:
            return {a: {"version": float(v), "drift": d} for a, (v, d) in self._drift.items()}

    def _check_canary(self, actor_id: str, version: int, answer: object) -> None:
        """Compare the actor's canary log-probs with the learner's for the version they were scored under (the
        pushed one, or a newer one the actor caught up to from the file meanwhile; unknown to an older actor)."""
        got = getattr(answer, "canary_logprobs", None)
        scored = getattr(answer, "canary_version", None)
        version = version if scored is None else scored
        with self._lock:
            want = self._canary.get(version)
        if got is None or want is None:
            return
        drift = max((abs(a - b) for a, b in zip(got, want, strict=False)), default=0.0)
        if len(got) != len(want):
            drift = float("inf")
        with self._lock:
            self._drift[actor_id] = (version, drift)
            self.stats.canary_drift_max = max(d for _, d in self._drift.values())
            if drift > self.canary_max_drift:
                self.stats.canary_alarms += 1
        if drift > self.canary_max_drift:
            log.warning("actor %s serves v%d with canary log-probs %.3g away from the learner's (threshold %.3g):"
                        " the weights it applied are not the ones sent", actor_id, version, drift,
                        self.canary_max_drift)

    def sync(self, latest: WeightsInfo | None) -> int:
        """Start pushes of `latest` to the actors that lag it; returns how many actors it started pushing to."""
        if latest is None or latest.path is None:
            return 0
        try:
            actors = self._live()
        except Exception as e:  # noqa: BLE001  (a registry hiccup must not stop training; retried next step)
            log.warning("cannot list live actors: %s", e)
            return 0
        now = time.monotonic()
        due: list[tuple[ActorInfo, _ActorState]] = []
        with self._lock:
            for actor in actors:
                st = self._actors.get(actor.actor_id)
                if st is None or st.started_at != actor.started_at:
                    st = self._actors[actor.actor_id] = _ActorState(started_at=actor.started_at)
                if actor.policy_version > latest.version:
                    self._ahead(actor, actor.policy_version)
                if st.in_flight is not None or now < st.retry_at:
                    continue
                if max(actor.policy_version, st.delivered, st.refused) >= latest.version:
                    continue
                due.append((actor, st))
            if self._use_relay(len(due)):
                chain = self._pool.submit(self._push_chain, sorted(due, key=lambda d: d[0].actor_id), latest)
                for _, st in due:
                    st.in_flight = chain
            else:
                for actor, st in due:
                    st.in_flight = self._pool.submit(self._push_one, actor, st, latest)
        return len(due)

    def _use_relay(self, n: int) -> bool:
        return n >= 2 and (self.fanout == "relay" or (self.fanout == "auto" and n > 2))

    def _push_one(self, actor: ActorInfo, st: _ActorState, info: WeightsInfo) -> None:
        t0 = time.monotonic()
        try:
            self._count_sent(info)
            answer = self._push_fn(
                actor.url, info.path, info.version, self._token, timeout_s=self._timeout_s, sha256=info.sha256
            )
        except Exception as e:  # noqa: BLE001  (any failure of one actor is logged and retried, never raised)
            self._book_failure(actor, st, info, getattr(e, "status", None), str(e))
        else:
            self._book_ok(actor, st, info, answer, time.monotonic() - t0)
        finally:
            with self._lock:
                st.in_flight = None

    def _push_chain(self, due: list[tuple[ActorInfo, _ActorState]], info: WeightsInfo) -> None:
        """One push to the first actor relaying to the others (actor_service.relay); a direct push to each actor
        the chain did not deliver to."""
        (head, head_st), rest = due[0], due[1:]
        t0 = time.monotonic()
        hops: dict[str, Any] = {}
        try:
            self._count_sent(info)
            answer = self._push_fn(head.url, info.path, info.version, self._token, timeout_s=self._timeout_s,
                                   sha256=info.sha256, relay=[a.url.rstrip("/") for a, _ in rest])
        except Exception as e:  # noqa: BLE001
            self._book_failure(head, head_st, info, getattr(e, "status", None), str(e))
        else:
            self._book_ok(head, head_st, info, answer, time.monotonic() - t0)
            for hop in answer.relayed:
                if hop.url not in hops or hop.status == 200:
                    hops[hop.url] = hop
        missed = []
        for actor, st in rest:
            hop = hops.get(actor.url.rstrip("/"))
            if hop is not None and hop.status == 200:
                self._book_ok(actor, st, info, hop, time.monotonic() - t0)
            elif hop is not None and hop.status == 409:
                self._book_failure(actor, st, info, 409, hop.detail)
            else:
                missed.append((actor, st))
        with self._lock:
            self.stats.relay_pushes += 1
            self.stats.relay_fallbacks += len(missed)
            for _, st in due:
                st.in_flight = None
            for actor, st in missed:
                log.info("relay of v%d did not reach %s: pushing directly", info.version, actor.actor_id)
                try:
                    st.in_flight = self._pool.submit(self._push_one, actor, st, info)
                except RuntimeError:  # the pusher is closing
                    break

    def _count_sent(self, info: WeightsInfo) -> None:
        with self._lock:
            self.stats.bytes_sent += info.nbytes

    def _book_failure(self, actor: ActorInfo, st: _ActorState, info: WeightsInfo, status: int | None,
                      message: str) -> None:
        with self._lock:
            if status == 409:
                # the version the actor holds: from its answer, else from its (maybe stale) heartbeat
                said = re.search(r"current version (\d+)", message)
                held = int(said.group(1)) if said else actor.policy_version
                if held == info.version:
                    # it already holds exactly this version (its own catch-up from WeightsStore, or a push
                    # that timed out but landed): the same number is the same weights (never reissued)
                    st.delivered = max(st.delivered, info.version)
                    log.info("actor %s already has v%d (409)", actor.actor_id, info.version)
                    return
                # it holds another version (newer, or one its heartbeat has not reported): not delivered; the
                # learner numbers its next weights past it (version_floor) and pushes those at once
                self._ahead(actor, max(info.version, held))
                st.refused = max(st.refused, info.version)
                log.warning("actor %s refused v%d (409, holds v%d)", actor.actor_id, info.version, held)
                return
            st.failures += 1
            st.retry_at = time.monotonic() + self._retry_s
            self.stats.pushes_failed += 1
            self.stats.last_error = f"{actor.actor_id}: {message}"
        log.warning("push of v%d to %s (%s) failed: %s", info.version, actor.actor_id, actor.url, message)

    def _book_ok(self, actor: ActorInfo, st: _ActorState, info: WeightsInfo, answer: object, dt: float) -> None:
        with self._lock:
            st.delivered = max(st.delivered, info.version)
            st.failures = 0
            self.stats.pushes_ok += 1
            self.stats.last_latency_s = dt
            self.stats.latencies_s = (self.stats.latencies_s + [dt])[-100:]
        log.info("pushed v%d to %s in %.3fs", info.version, actor.actor_id, dt)
        self._check_canary(actor.actor_id, info.version, answer)

    def _ahead(self, actor: ActorInfo, version: int) -> None:
        """Record an actor that holds `version`, newer than what this learner pushed (caller holds the lock)."""
        if version > self.version_floor:
            log.warning("actor %s holds v%d, ahead of this learner's weights: the next version will exceed it",
                        actor.actor_id, version)
            self.version_floor = version

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no push is in flight (tests, shutdown); True if idle within the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(st.in_flight is None for st in self._actors.values()):
                    return True
            time.sleep(0.02)
        return False

    def delivered(self) -> dict[str, int]:
        with self._lock:
            return {a: st.delivered for a, st in self._actors.items()}

    def close(self) -> None:
        # Pushes in flight finish (each bounded by its timeout); nothing new is started.
        self._pool.shutdown(wait=False, cancel_futures=True)
