"""Prometheus metrics and the live status counters of one actor (per-app registry: several apps share a test process)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RateWindow:
    """Events per second over the last `window_s` seconds (tokens/s, trajectories/s for status and gauges)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._total = 0.0  # sum of the amounts in _events (kept as they come and go: `rate` is O(1))
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def add(self, amount: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, amount))
            self._total += amount
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if not self._events:
                self._total = 0.0  # no rounding residue left behind
                return 0.0
            span = min(self.window_s, now - self._started)
            return self._total / max(span, 1e-3)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._total -= self._events.popleft()[1]


class ActorMetrics:
    """Counters exported on /metrics plus the plain numbers /v1/status reports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=_LATENCY_BUCKETS, registry=r)

        self.tokens = Counter("tbrm_actor_tokens_generated", "Response tokens generated", registry=r)
        self.trajectories = Counter(
            "tbrm_actor_trajectories", "Trajectories inserted into the buffer", registry=r
        )
        self.prompts = Counter("tbrm_actor_prompts", "Prompts finished (all samples inserted)", registry=r)
        self.prompts_skipped = Counter(
            "tbrm_actor_prompts_skipped", "Prompts dropped because they do not fit max_model_len", registry=r
        )
        self.prompts_given_back = Counter(
            "tbrm_actor_prompts_given_back", "Prompts returned to the queue unfinished", registry=r
        )
        self.batch_latency = latency("tbrm_actor_batch_seconds", "vLLM generate latency per batch")
        self.grade_latency = latency("tbrm_actor_grade_seconds", "Reward service latency per batch")
        self.insert_latency = latency(
            "tbrm_actor_insert_seconds", "Buffer insert latency per batch (rate-limiter waits included)"
        )
        self.tokens_per_s = Gauge(
            "tbrm_actor_tokens_per_second", "Generated tokens/s over the last minute", registry=r
        )
        self.trajectories_per_s = Gauge(
            "tbrm_actor_trajectories_per_second", "Inserted trajectories/s over the last minute", registry=r
        )
        self.weight_version = Gauge(
            "tbrm_actor_policy_version", "Weights version the engine serves", registry=r
        )
        self.weight_updates = Counter("tbrm_actor_weight_updates", "Weight updates applied", registry=r)
        self.update_latency = latency(
            "tbrm_actor_weight_apply_seconds", "Time to apply new weights to the running engine"
        )
        self.receive_latency = latency(
            "tbrm_actor_weight_receive_seconds", "Time to receive and verify a pushed weights body"
        )
        self.weight_bytes = Counter(
            "tbrm_actor_weight_bytes_received", "Weight push bytes received", registry=r
        )
        self.pushes_refused = Counter(
            "tbrm_actor_weight_pushes_refused", "Weight pushes refused, by reason", ["reason"], registry=r
        )
        self.reward_errors = Counter(
            "tbrm_actor_reward_errors", "Grade batches that failed (retried with backoff)", registry=r
        )
        self.redis_errors = Counter(
            "tbrm_actor_redis_errors", "Redis calls that failed (retried)", registry=r
        )
        self.backpressure_waits = Counter(
            "tbrm_actor_backpressure_waits", "Inserts that timed out on the buffer's rate limiter", registry=r
        )

        self._tok_rate = RateWindow()
        self._traj_rate = RateWindow()
        self.total_tokens = 0
        self.total_trajectories = 0
        self.total_updates = 0
        self.total_refused = 0
        self.last_batch_s = 0.0
        self.last_update_s = 0.0
        self.state = "starting"
        self.last_error: str | None = None
        self.prompts_in_flight = 0

    def record_generation(self, n_tokens: int, latency_s: float) -> None:
        self.tokens.inc(n_tokens)
        self.total_tokens += n_tokens
        self._tok_rate.add(n_tokens)
        self.batch_latency.observe(latency_s)
        self.last_batch_s = latency_s
        self.tokens_per_s.set(self._tok_rate.rate())

    def record_inserted(self, n_trajectories: int, n_prompts: int) -> None:
        self.trajectories.inc(n_trajectories)
        self.prompts.inc(n_prompts)
        self.total_trajectories += n_trajectories
        self._traj_rate.add(n_trajectories)
        self.trajectories_per_s.set(self._traj_rate.rate())

    def record_update(
        self, version: int, load_s: float, receive_s: float | None = None, nbytes: int = 0
    ) -> None:
        self.weight_updates.inc()
        self.total_updates += 1
        self.update_latency.observe(load_s)
        self.last_update_s = load_s
        self.weight_version.set(version)
        if receive_s is not None:
            self.receive_latency.observe(receive_s)
        if nbytes:
            self.weight_bytes.inc(nbytes)

    def record_refused(self, reason: str) -> None:
        self.pushes_refused.labels(reason=reason).inc()
        self.total_refused += 1

    def rates(self) -> tuple[float, float]:
        tok, traj = self._tok_rate.rate(), self._traj_rate.rate()
        self.tokens_per_s.set(tok)
        self.trajectories_per_s.set(traj)
        return tok, traj
