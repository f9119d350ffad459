"""Buffer at scale (imported by bench/buffer_bench.py for `--scale N`): fill one redis-server with N realistic
trajectories, report Redis memory (used_memory, RSS) at 100k and at N, and the p50/p99 of a 32-item sample+ack at
100k vs N items, measured alternately on a 100k table and the N table in the same Redis (same load for both).

Realistic rollouts (`RolloutModel`): Qwen2.5-sized vocabulary (151,646 ids, so ids take 3 bytes); token ids drawn
from a Zipf law over ranks (exponent 1.1, unigram entropy ~9.9 bits, like natural text) with a noisy rank -> id map
(frequent tokens mostly have low ids, as BPE merges do); texts are the detokenization of those ids through a fixed
table of 1-6 letter pieces (70% with a leading space), so text and ids carry the same content; behaviour log-probs
float32, 70% confident tokens (-Exp(0.02)) and 30% uncertain ones (-Exp(1.5)). Nothing is zeros or repeats: a pool of
512 distinct rollouts is inserted under fresh ids (generating 1M would take longer than inserting them).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from buffer import codec
from buffer.client import ReplayTable, TableConfig, Trajectory, connect
from buffer.schema import StorageConfig, UniformSampler

log = logging.getLogger("buffer_bench")
VOCAB = 151_646
POOL = 512
CHUNK = 500


class RolloutModel:
    """Generator of Qwen2.5-shaped rollouts (see the module docstring)."""

    def __init__(self, seed: int = 0, vocab: int = VOCAB) -> None:
        self.rng = np.random.default_rng(seed)
        key = np.log1p(np.arange(vocab)) + self.rng.normal(0.0, 1.5, vocab)
        self.rank_to_id = np.argsort(key)
        w = 1.0 / np.arange(1, vocab + 1) ** 1.1
        w /= w.sum()
        self.entropy_bits = float(-(w * np.log2(w)).sum())
        self.cdf = np.cumsum(w)
        lengths = self.rng.integers(1, 7, vocab)
        letters = self.rng.integers(97, 123, int(lengths.sum()), dtype=np.uint8).tobytes().decode()
        space = self.rng.random(vocab) < 0.7
        ends = np.cumsum(lengths)
        self.pieces = [(" " if space[i] else "") + letters[ends[i] - lengths[i]:ends[i]] for i in range(vocab)]

    def ids(self, n: int) -> list[int]:
        return self.rank_to_id[np.searchsorted(self.cdf, self.rng.random(n))].tolist()

    def logprobs(self, n: int) -> list[float]:
        sure = self.rng.random(n) < 0.7
        lp = np.where(sure, -self.rng.exponential(0.02, n), -self.rng.exponential(1.5, n))
        return lp.astype(np.float32).tolist()

    def rollout(self, k: int, tokens: int) -> Trajectory:
        prompt, response = self.ids(128), self.ids(tokens)
        return Trajectory(
            traj_id=f"m{k:08d}", prompt_id=f"p{k // 8}", group_id=f"g{k // 8}", prompt_token_ids=prompt,
            response_token_ids=response, behaviour_logprobs=self.logprobs(tokens),
            prompt_text="".join(self.pieces[i] for i in prompt), response_text="".join(self.pieces[i] for i in response),
            reward=float(k % 2), grade_status="correct" if k % 2 else "incorrect", policy_version=k // 1000,
            actor_id="bench",
        )


def fill(table: ReplayTable, pool: list[Trajectory], start: int, stop: int, prefix: str) -> None:
    """Insert items start..stop-1 (ids `prefix` + uuid-length hex, as real traj_ids: 32 characters)."""
    for lo in range(start, stop, CHUNK):
        batch = [pool[k % len(pool)].model_copy(update={"traj_id": f"{prefix}{k:031x}"})
                 for k in range(lo, min(stop, lo + CHUNK))]
        table.insert(batch, timeout_s=None)


def memory(r: Any, base: int, items: int) -> dict[str, Any]:
    info = r.info("memory")
    used, rss = int(info["used_memory"]), int(info["used_memory_rss"])
    return {"items": items, "used_memory": used, "used_memory_rss": rss, "bytes_per_item": (used - base) / items,
            "rss_bytes_per_item": rss / items}


def sample_ack(table: ReplayTable, batch: int) -> float:
    t0 = time.perf_counter()
    b = table.sample_columns(batch, learner_version=1)
    for i in range(len(b)):
        b.response_tokens(i)  # the learner reads the ids: decompression included
    table.ack(b.lease_id)
    return time.perf_counter() - t0


def paired_latency(small: ReplayTable, big: ReplayTable, batch: int, calls: int) -> dict[str, Any]:
    """`calls` sample+acks on each table, alternating in rounds of 20 (both see the same machine load)."""
    lat: dict[str, list[float]] = {"small": [], "big": []}
    for _ in range(calls // 20):
        for name, table in (("small", small), ("big", big)):
            lat[name] += [sample_ack(table, batch) for _ in range(20)]
    out = {}
    for name, xs in lat.items():
        xs.sort()
        out[f"{name}_p50_ms"] = 1e3 * xs[len(xs) // 2]
        out[f"{name}_p99_ms"] = 1e3 * xs[int(len(xs) * 0.99)]
    return out


def table(r: Any, name: str, size: int, storage: StorageConfig) -> ReplayTable:
    return ReplayTable(r, TableConfig(name=name, max_size=size, max_times_sampled=0, sampler=UniformSampler(),
                                      storage=storage))


def measure_scale(url: str, items: int, tokens: int, batch: int, storage: StorageConfig, *,
                  small: int = 100_000, calls: int = 400) -> dict[str, Any]:
    """Fill `items` (checkpoint at `small`), then a second table of `small` items; memory and paired latency."""
    r = connect(url, timeout_s=300)
    r.flushall()
    model = RolloutModel(seed=1)
    pool = [model.rollout(k, tokens) for k in range(POOL)]
    sizes = [len(codec.encode(t, storage)) for t in pool]
    base = int(r.info("memory")["used_memory"])
    big = table(r, "scale", items, storage)
    t0 = time.monotonic()
    marks = []
    for lo, hi in ((0, min(small, items)), (min(small, items), items)):
        if hi > lo:
            fill(big, pool, lo, hi, "a")
            marks.append({**memory(r, base, hi), "fill_s": time.monotonic() - t0})
            log.info("scale fill: %s", marks[-1])
    before_small = int(r.info("memory")["used_memory"])
    second = table(r, "scale_small", small, storage)
    fill(second, pool, 0, small, "b")
    lat = paired_latency(second, big, batch, calls)
    out = {"items": items, "small_items": small, "tokens": tokens, "storage": storage.model_dump(),
           "payload_bytes_mean": float(np.mean(sizes)), "token_entropy_bits": model.entropy_bits, "memory": marks,
           "small_table_bytes_per_item": (int(r.info("memory")["used_memory"]) - before_small) / small,
           "batch": batch, "calls_each": calls, **lat, "sample_p99_big_vs_small": lat["big_p99_ms"] / lat["small_p99_ms"]}
    log.info("scale: %s", out)
    r.flushall()
    return out
