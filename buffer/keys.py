"""Every Redis key name tbrm uses, built in this one module under the prefix ``tbrm:v1:``.

Other modules (and other packages, through `buffer.client`) never spell a key themselves, so a layout change is
one edit here and ``redis-cli --scan --pattern 'tbrm:v1:*'`` finds everything the project owns.
"""

from __future__ import annotations

import re

PREFIX = "tbrm:v1:"

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid {what} name {name!r}: use 1-64 characters from [A-Za-z0-9_.-]")
    return name


class _KeySet:
    """Keys `tbrm:v1:<kind>:{<name>}:<field>`, one attribute per field of FIELDS (all in one cluster slot)."""

    FIELDS: tuple[str, ...]
    KIND: str
    WHAT: str

    def __init__(self, name: str) -> None:
        self.name = _check(name, self.WHAT)
        base = f"{PREFIX}{self.KIND}:{{{name}}}:"
        for field in self.FIELDS:
            setattr(self, field, base + field)

    def all(self) -> list[str]:
        return [getattr(self, f) for f in self.FIELDS]


class TableKeys(_KeySet):
    """Keys of one replay table ``tbrm:v1:table:{<name>}:*``. The braces are a Redis Cluster hash tag: every key
    of a table hashes to one slot, so each Lua script and MULTI touches one node. To spread load over a
    cluster, shard by table: several tables (e.g. one per actor group) land on different slots.

    - ``config``   STRING  JSON of the TableConfig every user of the table must share
    - ``items``    HASH    item_id -> encoded Trajectory (see `buffer.codec`)
    - ``order``    ZSET    item_id -> insertion sequence number (all stored items; fifo remover)
    - ``avail``    ZSET    item_id -> insertion sequence number: the items stored and not out on a lease, for the
                           fifo and lifo samplers (and tables of earlier versions until it empties);
                           ``avail_set`` SET of the same for the uniform and prioritized samplers (no order needed)
    - ``byver``    ZSET    item_id -> policy_version (staleness filter, version histograms)
    - ``meta``     HASH    item_id -> NUL, inserted_at and policy_version as little-endian doubles, then
                           "reward|actor_id" (written once at insert; the sample script copies the 16-byte head into
                           its reply; entries of earlier versions: "inserted_at|reward|actor_id")
    - ``handed``   HASH    item_id -> times handed out by `sample` (leases included)
    - ``acked``    HASH    item_id -> times acked (max_times_sampled counts these; not kept when it is 1)
    - ``prio``     HASH    item_id -> priority (prioritized sampler)
    - ``slot``     HASH    item_id -> leaf slot in the priority sum tree, and "#<slot>" -> item_id;
                           ``slotfree`` LIST of freed slots
    - ``tree``     HASH    sum tree node index -> sum of p_i^exponent below it (prioritized sampler)
    - ``refs``     HASH    item_id -> cached reference log-probs (`cache_reference`)
    - ``lease_of`` HASH    item_id -> lease id currently holding the item
    - ``leases``   HASH    lease id -> msgpack list of its item ids;  ``lease_exp`` ZSET lease id -> expiry (unix s)
    - ``counters`` HASH    inserts, samples, acks, consumed, removed, dropped_stale, expired, seq, nextslot,
                           rl_inserts, rl_samples (the rate limiter's I and S')
    - ``paused``   HASH    "sampling"/"inserts" -> "1" while an operator paused that side
    - ``gone``     ZSET    item_id -> removal sequence of the newest ``remember_removed_ids`` removed items
                           (consumed, evicted, dropped): a retried insert of one of them is a duplicate
    - ``waiters``  ZSET    insert call id -> when the rate limiter first refused it (unix s): the line of held-back
                           inserts (see `buffer.table`); ``waiter_info`` HASH call id -> last seen (unix s) and items
                           still wanted (2 little-endian doubles)
    """

    FIELDS = (
        "config", "items", "order", "avail", "byver", "meta", "handed", "acked", "prio", "slot", "slotfree",
        "tree", "refs", "lease_of", "leases", "lease_exp", "counters", "paused", "gone", "avail_set", "waiters",
        "waiter_info",
    )
    KIND, WHAT = "table", "table"

    def contents(self) -> list[str]:
        """Every key except the shared config (what `reset` deletes)."""
        return [getattr(self, f) for f in self.FIELDS if f != "config"]


class PromptQueueKeys(_KeySet):
    """Keys of one prompt queue ``tbrm:v1:prompts:{<name>}:*`` (one Redis Cluster slot, like a table).

    - ``data``      HASH    dataset index -> Prompt JSON (one copy of the dataset)
    - ``queue``     LIST    "epoch:index" tokens of the current epoch still to hand out (shuffled)
    - ``claims``    HASH    consumer_id + "\\x1f" + prompt_id -> JSON list of claimed tokens
    - ``claim_exp`` ZSET    same field -> claim expiry (unix s)
    - ``meta``      HASH    n (dataset size), epochs (total), epoch (last epoch started), seed, loaded_at, done
    - ``pops``      HASH    consumer_id -> JSON of its last pop with a request id (replayed to a retry of it)
    """

    FIELDS = ("data", "queue", "claims", "claim_exp", "meta", "pops")
    KIND, WHAT = "prompts", "prompt queue"


ACTORS = f"{PREFIX}{{actors}}"
"""HASH actor_id -> ActorInfo JSON (hash tag {actors}: one slot with ACTORS_EXP)."""
ACTORS_EXP = f"{PREFIX}{{actors}}:exp"
"""ZSET actor_id -> heartbeat expiry (unix s); live() = members with expiry > now."""
WEIGHTS_LATEST = f"{PREFIX}weights:latest"
"""STRING WeightsInfo JSON of the newest weights the learner published."""
LEARNER_STATUS = f"{PREFIX}learner:status"
"""STRING LearnerStatus JSON."""
