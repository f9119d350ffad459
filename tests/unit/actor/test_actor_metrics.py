"""actor_service.metrics.RateWindow: a sliding-window rate kept as a running sum."""

from __future__ import annotations

import pytest

from actor_service.metrics import RateWindow


def test_rate_window_sums_the_window_and_forgets_what_left_it() -> None:
    w = RateWindow(window_s=10.0)
    w._started = 0.0
    for t in range(30):
        w.add(t + 1, now=float(t))
    # events at t = 20..29 (amounts 21..30) are inside [19.5, 29.5]; the span is the whole window
    assert w.rate(now=29.5) == pytest.approx(sum(range(21, 31)) / 10.0)
    assert w.rate(now=100.0) == 0.0  # everything expired
    w.add(5.0, now=100.0)
    assert w.rate(now=101.0) == pytest.approx(0.5)  # no residue of the expired events


def test_rate_window_is_cheap_with_many_events() -> None:
    import time

    w = RateWindow(window_s=1e9)
    for i in range(20_000):
        w.add(1.0, now=float(i))
    t0 = time.process_time()
    for _ in range(2_000):
        w.rate(now=20_000.0)
    assert time.process_time() - t0 < 0.2  # O(1): summing 20k events 2k times took seconds
