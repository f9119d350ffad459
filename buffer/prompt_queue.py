"""PromptQueue: a dataset served to actors in shuffled epochs, popped atomically with expiring claims.

The dataset is stored once (index -> Prompt JSON); the queue holds "epoch:index" tokens of the current epoch,
shuffled with ``random.Random(shuffle_seed * 1_000_003 + epoch)`` (epoch e is the same permutation on every
host). `pop` moves tokens into per-consumer claims that expire after ``lease_s``: an actor that dies mid-batch
gets its prompts re-served to others; `done` drops claims, `give_back` returns unfinished prompts at once.
When an epoch runs out, the first consumer to notice claims the refill (a lock with a REFILL_LOCK_S expiry) and
pushes the next permutation (compare-and-set on the epoch number, so exactly one push happens); the others wait
for it instead of each sending the whole permutation.
"""

from __future__ import annotations

import random
import time
from importlib import resources
from typing import Any

import redis as redis_lib

from buffer.keys import PromptQueueKeys
from buffer.schema import Prompt

REFILL_LOCK_S = 30.0
"""A consumer that claimed an epoch refill holds the claim this long (then another may take over)."""


def _lua(name: str) -> str:
    return resources.files("buffer").joinpath("lua", name).read_text()


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class PromptQueue:
    """Prompts for the actors; every prompt of every epoch is handed to exactly one consumer (until its claim
    expires or it is given back)."""

    def __init__(self, redis: redis_lib.Redis, name: str = "train") -> None:
        self.redis = redis
        self.keys = PromptQueueKeys(name)
        self._pop = redis.register_script(_lua("prompt_pop.lua"))
        self._ops = redis.register_script(_lua("prompt_ops.lua"))

    @staticmethod
    def _order(n: int, epoch: int, seed: int | None) -> list[str]:
        idx = list(range(n))
        if seed is not None:
            random.Random(seed * 1_000_003 + epoch).shuffle(idx)
        return [f"{epoch}:{i}" for i in idx]

    def load(self, prompts: list[Prompt], epochs: int = 1, shuffle_seed: int | None = 0,
             *, if_empty: bool = False) -> int:
        """Replace the queue with `prompts` for `epochs` passes; returns prompts to serve (len * epochs).

        With `if_empty=True` a queue that holds a dataset is kept, even one whose prompts are all handed out or
        claimed (a resumed run continues its epochs), and 0 is returned; several processes may race to load
        at start-up and exactly one wins. The load is one transaction: a crash mid-way loads nothing.
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs={epochs!r} must be an integer >= 1")
        if not prompts:
            raise ValueError("prompts is empty: nothing to load")
        ids = [p.prompt_id for p in prompts]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"duplicate prompt_id {dup!r}: prompt ids must be unique within a dataset")
        k = self.keys
        with self.redis.pipeline(transaction=True) as p:
            if if_empty:
                # WATCH instead of a "loading" marker: a loader that dies before EXEC leaves nothing behind.
                p.watch(k.meta)
                if p.hexists(k.meta, "n"):
                    return 0
                p.multi()
            p.unlink(k.data, k.queue, k.claims, k.claim_exp, k.meta)
            for start in range(0, len(prompts), 2000):
                p.hset(k.data, mapping={str(start + j): q.model_dump_json(exclude={"epoch"})
                                        for j, q in enumerate(prompts[start:start + 2000])})
            order = self._order(len(prompts), 0, shuffle_seed)
            for start in range(0, len(order), 2000):
                p.rpush(k.queue, *order[start:start + 2000])
            p.hset(k.meta, mapping={"n": len(prompts), "epochs": epochs, "epoch": 0,
                                    "seed": "" if shuffle_seed is None else shuffle_seed,
                                    "loaded_at": time.time(), "done": 0, "reclaimed": 0})
            try:
                p.execute()
            except redis_lib.WatchError:  # another process loaded meanwhile
                return 0
        return len(prompts) * epochs

    def loaded(self) -> bool:
        """Whether a dataset is loaded (even if every prompt has been handed out)."""
        return bool(self.redis.hexists(self.keys.meta, "n"))

    def _meta(self) -> dict[str, str]:
        return {_s(a): _s(b) for a, b in self.redis.hgetall(self.keys.meta).items()}

    def pop(self, n: int, consumer_id: str, lease_s: float = 600.0, request_id: str | None = None) -> list[Prompt]:
        """Claim up to `n` prompts (fewer only when the last epoch runs out; [] when all are served).

        `request_id` makes a retry safe: a pop repeated with the id of the consumer's last pop (its reply was lost,
        e.g. the connection dropped after Redis ran the script) claims nothing new and returns the same prompts
        (those the consumer still holds), instead of leaving them claimed by nobody until the claims expire.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be an integer >= 1")
        if not consumer_id or "\x1f" in consumer_id:
            raise ValueError(f"consumer_id={consumer_id!r} must be non-empty (and without \\x1f)")
        if not lease_s > 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        if request_id is not None and not request_id:
            raise ValueError("request_id must be non-empty (or None)")
        out: list[Prompt] = []
        deadline = time.monotonic() + 2 * REFILL_LOCK_S
        for round_ in range(100_000):  # bounded: each round returns, pushes the next epoch or waits for its push
            res = self._pop(keys=self.keys.all(),
                            args=[n - len(out), consumer_id, repr(float(lease_s)), request_id or "", round_])
            status, epoch = _s(res[0]), int(res[1])
            for j in range(2, len(res), 2):
                tok = _s(res[j])
                out.append(Prompt.model_validate_json(res[j + 1]).model_copy(update={"epoch": int(tok.split(":")[0])}))
            if status != "refill":
                return out
            if time.monotonic() > deadline:
                break
            # One consumer builds and sends the next epoch's permutation; the others wait for it.
            if self._ops(keys=self.keys.all(), args=["refill_claim", epoch, repr(REFILL_LOCK_S)]):
                meta = self._meta()
                seed = int(meta["seed"]) if meta.get("seed") else None
                order = self._order(int(meta["n"]), epoch + 1, seed)
                self._ops(keys=self.keys.all(), args=["refill", epoch] + order)
            else:
                time.sleep(0.01)
        return out

    def done(self, consumer_id: str, prompt_ids: list[str]) -> None:
        """The consumer finished these prompts: drop their claims."""
        if prompt_ids:
            self._ops(keys=self.keys.all(), args=["done", consumer_id, *prompt_ids])

    def give_back(self, consumer_id: str, prompts: list[Prompt]) -> None:
        """Return unfinished prompts to the head of the queue now (instead of waiting for claim expiry)."""
        args: list[Any] = []
        for q in prompts:
            args += [q.prompt_id, q.epoch]
        if args:
            self._ops(keys=self.keys.all(), args=["give_back", consumer_id, *args])

    def renew(self, consumer_id: str, prompt_ids: list[str], lease_s: float) -> int:
        """Extend the consumer's claims on these prompts to `lease_s` from now (a consumer that still works on them,
        e.g. waiting on back-pressure); claims already expired and re-served are not taken back. Returns how many
        were renewed."""
        if not lease_s > 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        if not prompt_ids:
            return 0
        return int(self._ops(keys=self.keys.all(), args=["renew", consumer_id, repr(float(lease_s)), *prompt_ids]))

    def size(self) -> int:
        """Prompts not yet handed out: the rest of this epoch plus every later epoch (claims not counted)."""
        meta = self._meta()
        if not meta.get("n"):
            return 0
        rest = int(meta["epochs"]) - int(meta["epoch"]) - 1
        return int(self.redis.llen(self.keys.queue)) + max(0, rest) * int(meta["n"])

    def epochs(self) -> tuple[int, int]:
        """(current epoch index, total epochs)."""
        meta = self._meta()
        return int(meta.get("epoch", 0)), int(meta.get("epochs", 0))

    def claimed(self) -> int:
        vals = self.redis.hvals(self.keys.claims)
        return sum(_s(v).count(":") for v in vals)

    def claims(self, limit: int = 100) -> list[dict[str, Any]]:
        """The `limit` claims expiring first: consumer, prompt_id, copies claimed (one per epoch), expires_at."""
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1")
        rows = self.redis.zrange(self.keys.claim_exp, 0, limit - 1, withscores=True)
        vals = self.redis.hmget(self.keys.claims, [f for f, _ in rows]) if rows else []
        out = []
        for (field, exp), val in zip(rows, vals, strict=True):
            consumer, _, prompt_id = _s(field).partition("\x1f")
            out.append({"consumer": consumer, "prompt_id": prompt_id, "expires_at": float(exp),
                        "copies": _s(val).count(":") if val is not None else 0})
        return out

    def info(self) -> dict[str, Any]:
        meta = self._meta()
        epoch, epochs = self.epochs()
        return {"name": self.keys.name, "dataset_size": int(meta.get("n", 0)), "epoch": epoch, "epochs": epochs,
                "queued": self.size(), "claimed": self.claimed(), "done": int(meta.get("done", 0)),
                "reclaimed": int(meta.get("reclaimed", 0)), "loaded": bool(meta.get("n"))}
