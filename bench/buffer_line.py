"""Blocked inserters on a rate-limited table (part of bench/buffer_bench.py): how the room one sampler frees is
shared by several actor processes that insert as fast as the limiter lets them.

Each inserter process inserts batches of 4 small trajectories in a loop for `seconds`; one sampler process leases 8
items, holds them 10 ms (a learner step) and acks them. The table's limiter (samples_per_insert 1, error_buffer
16) holds the inserters back, so every insert call waits for room. Reported: items inserted per inserter (their
smallest / largest share, and Jain's fairness index) and how long insert calls waited (p99 and longest): a
starved inserter shows as a long wait even when the shares over the whole run look even.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

from buffer.client import ReplayTable, Trajectory, connect
from buffer.schema import RateLimiterConfig, TableConfig, UniformSampler

BATCH = 4


def _traj(item_id: str) -> Trajectory:
    return Trajectory(traj_id=item_id, prompt_id="p", group_id="g", prompt_token_ids=[1, 2, 3],
                      response_token_ids=list(range(64)), behaviour_logprobs=[-0.5] * 64, reward=0.0,
                      grade_status="incorrect", policy_version=0, actor_id="bench")


def _inserter(url: str, k: int, seconds: float, start: Any, out: Any) -> None:
    table = ReplayTable(connect(url), name="line")
    start.wait()
    end, n, waits = time.monotonic() + seconds, 0, []
    while time.monotonic() < end:
        t0 = time.monotonic()
        table.insert([_traj(f"i{k}-{n + j}") for j in range(BATCH)], timeout_s=60)
        waits.append(time.monotonic() - t0)
        n += BATCH
    out.put((k, n, waits))


def _sampler(url: str, seconds: float, start: Any) -> None:
    table = ReplayTable(connect(url), name="line")
    start.wait()
    end = time.monotonic() + seconds + 1  # outlasts the inserters: none is left blocked at the end
    while time.monotonic() < end:
        try:
            lease = table.sample(8, 0, timeout_s=0.5).lease_id
        except TimeoutError:
            continue
        time.sleep(0.01)
        table.ack(lease)


def measure_line(url: str, inserters: int = 4, seconds: float = 8.0) -> dict[str, Any]:
    rl = RateLimiterConfig(min_size_to_sample=8, samples_per_insert=1.0, error_buffer=16.0)
    ReplayTable(connect(url), TableConfig(name="line", max_size=1_000_000, max_times_sampled=1,
                                          sampler=UniformSampler(), rate_limiter=rl))
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_inserter, args=(url, k, seconds, start, out)) for k in range(inserters)]
    procs.append(ctx.Process(target=_sampler, args=(url, seconds, start)))
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    got = sorted(out.get(timeout=seconds + 120) for _ in range(inserters))
    for p in procs:
        p.join(30)
    items = [n for _, n, _ in got]
    waits = sorted(w for _, _, ws in got for w in ws)
    return {"inserters": inserters, "seconds": seconds, "items_per_inserter": items,
            "min_over_max_share": min(items) / max(items),
            "jain_index": sum(items) ** 2 / (len(items) * sum(n * n for n in items)),
            "insert_wait_p99_s": waits[int(0.99 * (len(waits) - 1))], "insert_wait_max_s": waits[-1],
            "insert_calls": len(waits)}
