"""Redis calls of the sampling loop (actor_service.loop): retried with back-off while Redis is down, or a bounded
number of attempts during shutdown. The loop's state and error counters in ActorMetrics follow the outage."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis as redis_lib

from actor_service.metrics import ActorMetrics
from buffer.client import RateLimitTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")
REDIS_ERRORS = (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError)
"""Connection trouble. `RateLimitTimeout` is a TimeoutError, hence an OSError, but it is the buffer's answer, not
an outage: `retry` lets it through to the caller (back-pressure), never into the outage back-off."""


class Stopping(Exception):
    """Raised inside the loop when stop() was requested while it waited on a dependency."""


class RedisCalls:
    """`retry` (until Redis answers or stop is set) and `bounded` (a few attempts regardless of stop)."""

    def __init__(self, stop: threading.Event, metrics: ActorMetrics) -> None:
        self.stop = stop
        self.metrics = metrics

    def retry(self, fn: Callable[[], T], what: str) -> T:
        """Call fn until Redis answers; waits with backoff while it is down. Always tries at least once (so a
        group finishing during shutdown still gets inserted), then raises Stopping if stop() was requested."""
        delay = 0.2
        while True:
            try:
                result = fn()
                if self.metrics.state == "redis_unavailable":
                    log.info("redis is back (%s)", what)
                    self.metrics.state = "running"
                return result
            except RateLimitTimeout:
                raise  # back-pressure: the caller's to handle (actor_service.loop `_insert`)
            except REDIS_ERRORS as e:
                self.metrics.redis_errors.inc()
                self.metrics.state = "redis_unavailable"
                self.metrics.last_error = f"redis unavailable during {what}: {type(e).__name__}: {e}"
                if self.stop.is_set():
                    raise Stopping from e
                log.warning("%s; retrying in %.1fs", self.metrics.last_error, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def bounded(self, fn: Callable[[], object], what: str, attempts: int = 5) -> bool:
        """A few attempts regardless of stop (for give-back/deregister during shutdown)."""
        for i in range(attempts):
            try:
                fn()
                return True
            except REDIS_ERRORS as e:
                log.warning("%s failed (attempt %d/%d): %s", what, i + 1, attempts, e)
                time.sleep(min(0.2 * 2**i, 2.0))
        log.error("%s failed after %d attempts", what, attempts)
        return False
