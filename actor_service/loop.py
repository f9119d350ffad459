"""The sampling loop of an actor: prompt queue -> chat template -> vLLM (n samples, log-probs) -> reward -> buffer.

Continuous generation (vLLM's add_request/step loop, actor_service.engine), two background threads:
- feed: keeps the engine running K = `max_inflight_sequences` sequences (its max_num_seqs) with a reserve of K/2
  (K/4 with between-batches weight updates) more queued in it (the n samples of a prompt finish at different
  times: a finished sample's seat is taken at once), popping prompts (claimed with a TTL, never handed to two
  actors) in chunks of at least half the reserve as sequences finish, tokenized in one call; each prompt is one
  request of n samples;
- post: takes every prompt group whose n samples are done, and those finishing within GRADE_LINGER_S after it
  (one wait, cut short when the engine runs empty), grades them in one reward call, inserts the Trajectories
  (blocks on the buffer's rate limiter: backpressure), marks the prompts done.
The engine never idles on the longest sequence of a batch. Backpressure: at most K + reserve sequences in flight
and K more waiting for insertion, so the engine stops after about K more once the buffer refuses inserts. The
engine's steps are mostly Python on a small model: any work of these threads slows them (the GIL, shared cores),
so the per-group work is batched, the threads wake only when they have work (never per finished group), and the
announced weights version is not read from Redis per refill.

Failures: reward down or the buffer holding inserts back -> wait and retry the same groups; the prompt claims held
are renewed (every third of `prompt_lease_s`, with the heartbeat and in those waits) so that no other actor is
served them meanwhile; Redis down -> every call
waits and retries; stop() (SIGTERM) -> no new prompts, this actor's requests are aborted and every claim not being
inserted right now is given back at once (an orchestrator's grace period is shorter than a batch), an insert that
waits on back-pressure gives up within `STOP_POLL_S`, groups already graded are inserted if that succeeds
promptly (else given back), deregister.
Weights: pushes arrive over HTTP (actor_service.app); the engine applies them between two steps (`weight_updates =
"inflight"`, samples record the versions of their first and last token) or once the requests in flight are done
(`"between_batches"`). Before a refill a newer version announced in the WeightsStore (read at most every
CATCH_UP_EVERY_S, every time in sync mode) is loaded from its file when this machine can read it (catch-up after a
restart).
`sync`: nothing starts until the engine holds the announced version, and exactly `prompts_per_batch x
n_samples_per_prompt` trajectories are generated per version (one learner batch, as `tbrm up --sync` sizes it),
then the actor waits for the next version (groups given back after a failed insert are generated again).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable

import redis as redis_lib

from actor_service.engine import ActorEngine, Completion
from actor_service.groups import Group, catch_up, grade_items, to_trajectories
from actor_service.metrics import ActorMetrics
from actor_service.redis_calls import REDIS_ERRORS, RedisCalls, Stopping
from actor_service.settings import ActorSettings
from buffer.client import (
    ActorInfo,
    ActorRegistry,
    Prompt,
    PromptQueue,
    RateLimitTimeout,
    ReplayTable,
    Trajectory,
    WeightsStore,
    connect,
)
from reward.client import RewardClient, RewardServiceError
from reward.schema import GradeResult

log = logging.getLogger(__name__)

MAX_GROUPS_PER_GRADE = (
    256  # most finished prompt groups graded in one reward call (all that are ready, up to this)
)
GRADE_LINGER_S = 0.2
"""The post thread waits this long after a group finishes for more to finish (while sequences are still in the
engine), so that one reward call, one insert and one `done` carry several groups: its per-call costs hold the GIL
the engine's driver needs (0.2 s instead of 0.05 halved the post thread's CPU in `make bench-actor`, 2026-12-04)."""
RESERVE_DIVISOR = {"inflight": 2, "between_batches": 4}
"""The reserve is K / this. K/2 with in-flight updates: with K/4 the engine's queue ran empty in half of its steps
and the actor reached 0.86-0.87 of vLLM's own throughput in `make bench-actor`, with K/2 0.88-0.90 (2026-12-05).
K/4 between batches: a push waits until every queued sequence has run, so a longer queue delays it."""
CATCH_UP_EVERY_S = 0.5
"""Outside sync mode the feed reads the announced weights version from Redis at most this often (pushes arrive over
HTTP; the catch-up only serves an actor that missed one)."""
STOP_POLL_S = 1.0
"""Longest single wait on the buffer's rate limiter: a waiting insert notices stop() (and renews claims) this often."""


class ActorLoop:
    """Background sampling loop; `start()` / `stop()` (idempotent, bounded)."""

    def __init__(
        self,
        settings: ActorSettings,
        engine: ActorEngine,
        metrics: ActorMetrics | None = None,
        *,
        reward_client: RewardClient | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or ActorMetrics()
        self.actor_id = settings.actor_id
        self.reward = reward_client or RewardClient(
            settings.reward_url, timeout_s=settings.reward_timeout_s, retries=2
        )
        self.capacity = settings.capacity
        self.reserve = max(settings.n_samples_per_prompt, self.capacity // RESERVE_DIVISOR[settings.weight_updates])
        """Sequences submitted beyond K: the engine runs K (its `max_num_seqs`) and queues these, so a sample that
        finishes before its siblings leaves no seat empty, and the feed refills in chunks of half of them."""
        self._stop = threading.Event()
        self._redis_call = RedisCalls(self._stop, self.metrics)
        self._thread = threading.Thread(target=self._run, name=f"actor-feed-{self.actor_id}", daemon=True)
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="actor-heartbeat", daemon=True)
        self._post_thread = threading.Thread(target=self._post_loop, name="actor-post", daemon=True)
        self._lock = threading.Lock()
        self._groups: dict[int, Group] = {}  # id(group) -> claimed, not yet done or given back
        self._finishing: set[int] = set()  # ids of groups the post thread grades/inserts (stop() leaves them)
        self._renewed_at = time.monotonic()
        self._in_engine = 0  # sequences submitted and not finished
        self._engine_empty = threading.Event()  # set while _in_engine is 0: the post thread stops lingering
        self._engine_empty.set()
        self._waiting = 0  # sequences finished and not yet inserted
        self._finished: queue.Queue[Group] = queue.Queue()
        self._room = threading.Event()  # set when sequences finish: the feed thread may refill
        self._redis: redis_lib.Redis | None = None
        self._queue: PromptQueue | None = None
        self._table: ReplayTable | None = None
        self._registry: ActorRegistry | None = None
        self._weights: WeightsStore | None = None
        self._registered = False
        self._failed_catch_up: set[int] = set()
        self._latest: int | None = None  # announced weights version (`_latest_version`)
        self._latest_at = float("-inf")
        self._sync_counts: dict[int, int] = {}  # sync mode: version -> trajectories generated with it
        self._started_at = time.time()
        self.batches = 0

    # ---- lifecycle ----
    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking prompts, abort or finish what is in flight, give back the rest, deregister. Idempotent."""
        if timeout_s is None:
            timeout_s = 2 * self.settings.reward_timeout_s + self.settings.insert_timeout_s + 60.0
        self._stop.set()
        self._room.set()
        self.metrics.state = "stopping"
        deadline = time.monotonic() + timeout_s
        # Claims first: SIGKILL follows SIGTERM after the grace period, and a claim left behind is stranded for
        # prompt_lease_s. Only groups the post thread is inserting right now wait for it.
        self._abort_own()
        self._give_back_all(keep_finishing=True)
        for thread in (self._thread, self._post_thread):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.error("%s did not stop within %.0fs; giving its prompts back", thread.name, timeout_s)
        self._give_back_all()
        if self._hb_thread.is_alive():
            self._hb_thread.join(self.settings.heartbeat_interval_s + 5.0)
        if self._registered and self._registry is not None:
            self._redis_call.bounded(lambda: self._registry.deregister(self.actor_id), "deregister")
            self._registered = False
        self.reward.close()
        if self._redis is not None:
            self._redis.close()
        self.metrics.state = "stopped"
        log.info("actor %s stopped after %d batches", self.actor_id, self.batches)

    # ---- redis ----
    def _connect(self) -> None:
        self._redis = connect(self.settings.redis_url)
        r = self._redis
        self._queue = PromptQueue(r, self.settings.prompt_queue)
        self._registry = ActorRegistry(r)
        self._weights = WeightsStore(r)
        self._table = self._redis_call.retry(
            lambda: ReplayTable(r, self.settings.table), "open the replay table"
        )

    def _info(self) -> ActorInfo:
        tok_s, _ = self.metrics.rates()
        return ActorInfo(
            actor_id=self.actor_id,
            url=self.settings.resolved_public_url(),
            policy_version=self.engine.version,
            started_at=self._started_at,
            tokens_per_s=tok_s,
            trajectories=self.metrics.total_trajectories,
            status=self.metrics.state,
        )

    def _register(self) -> None:
        assert self._registry is not None
        self._redis_call.retry(
            lambda: self._registry.register(self._info(), ttl_s=self.settings.registry_ttl_s), "register"
        )
        self._registered = True
        log.info("registered actor %s at %s", self.actor_id, self.settings.resolved_public_url())

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            assert self._registry is not None
            self._renew_claims()  # also covers a slow reward call, not only the waits that renew themselves
            try:
                tok_s, _ = self.metrics.rates()
                self._registry.heartbeat(
                    self.actor_id,
                    ttl_s=self.settings.registry_ttl_s,
                    policy_version=self.engine.version,
                    tokens_per_s=tok_s,
                    trajectories=self.metrics.total_trajectories,
                    status=self.metrics.state,
                )
            except KeyError:  # expired while Redis was away (or flushed): register again
                try:
                    self._registry.register(self._info(), ttl_s=self.settings.registry_ttl_s)
                except REDIS_ERRORS as e:
                    log.warning("re-register failed: %s", e)
            except REDIS_ERRORS as e:
                log.warning("heartbeat failed: %s", e)

    # ---- feed thread ----
    def _run(self) -> None:
        try:
            self._connect()
            self._register()
            self._hb_thread.start()
            self._post_thread.start()
            self._latest_version()
        except Stopping:
            return
        self.metrics.state = "running"
        while not self._stop.is_set():
            try:
                self._room.clear()
                ready = self._ready_to_sample()
                want = self._prompts_to_pop() if ready else 0
                if want == 0:
                    # No room: a finished sequence or an insert sets _room, so the feed sleeps until then (a short
                    # poll would take core time from the engine's threads); the timeout only bounds the catch-up.
                    busy = ready and (self._in_engine > 0 or self._waiting > 0)
                    self._room.wait(CATCH_UP_EVERY_S if busy else self.settings.idle_sleep_s)
                    continue
                assert self._queue is not None
                # One request id for all retries of this pop: a retry after a lost reply gets the same prompts.
                prompts = self._redis_call.retry(
                    lambda want=want, rid=uuid.uuid4().hex: self._queue.pop(
                        want, self.actor_id, lease_s=self.settings.prompt_lease_s, request_id=rid
                    ),
                    "pop prompts",
                )
                if not prompts:
                    if not self._groups:
                        self.metrics.state = "idle"
                    self._stop.wait(self.settings.idle_sleep_s)
                    continue
                self._submit(self._claim(prompts))
            except Stopping:
                break
            except Exception as e:  # keep sampling: a bad prompt must not kill the actor
                log.exception("submitting prompts failed")
                self.metrics.last_error = f"{type(e).__name__}: {e}"
                self._stop.wait(1.0)
        self._abort_own()

    def _free_sequences(self) -> int:
        """Sequences the engine may take now: up to K + `reserve` in the engine (it runs K, see `reserve`), and at
        most K more waiting for insertion (the post thread holds finished groups for GRADE_LINGER_S)."""
        k = self.capacity
        with self._lock:
            room = k + self.reserve - self._in_engine
            return max(0, min(room, room + k - self._waiting))

    def _free_prompts(self) -> int:
        """Prompts the engine has seats for (0 = wait): at least half the reserve's worth, unless nothing is in
        flight."""
        n = self.settings.n_samples_per_prompt
        idle = self._in_engine == 0 and self._waiting == 0
        free = self._free_sequences() // n
        if not idle and free < self._refill_chunk():
            return 0
        return max(free, 1 if idle else 0)

    def _prompts_to_pop(self) -> int:
        """Prompts to submit now: `_free_prompts`, in sync mode at most what is left of this version's one batch."""
        free = self._free_prompts()
        left = self._sync_left()
        return free if left is None else min(free, left)

    def _wake_feed(self) -> None:
        """Wake the feed thread when it has seats to fill: a wake-up to wait again would only take the GIL from
        the engine's driver."""
        if self._free_prompts():
            self._room.set()

    def _refill_chunk(self) -> int:
        """Fewest prompts the feed submits while sequences are in flight (half the reserve's worth)."""
        n = self.settings.n_samples_per_prompt
        return max(1, self.reserve // n // 2)

    def _sync_left(self) -> int | None:
        """Sync mode: prompts still to generate with the engine's version (one batch per version); else None."""
        s = self.settings
        if not s.sync:
            return None
        with self._lock:
            done = self._sync_counts.get(self.engine.version, 0)
        return max(0, s.prompts_per_batch - done // s.n_samples_per_prompt)

    def _ready_to_sample(self) -> bool:
        """Catch up to announced weights; in sync mode, only sample on the announced version, one batch each."""
        latest = self._latest_version()
        behind = latest is not None and self.engine.version < latest
        if self.settings.sync and (behind or self._sync_left() == 0):
            if self.metrics.state != "waiting_for_weights" and not self._groups:
                log.info(
                    "sync mode: waiting for weights version %d (have %d)",
                    latest if behind else self.engine.version + 1,
                    self.engine.version,
                )
                self.metrics.state = "waiting_for_weights"
            return False
        return True

    def _claim(self, prompts: list[Prompt]) -> list[Group]:
        """Tokenize popped prompts (one batch call) into held groups; a prompt too long for the model is dropped
        (marked done)."""
        eng = self.engine
        texts, all_ids = eng.chat_prompts([p.messages for p in prompts], self.settings.system_prompt or None)
        groups: list[Group] = []
        skipped: list[str] = []
        for p, text, ids in zip(prompts, texts, all_ids, strict=True):
            if eng.fits(ids):
                groups.append(Group(p, ids, text))
            else:
                skipped.append(p.prompt_id)
        with self._lock:
            self._groups.update((id(g), g) for g in groups)
            self.metrics.prompts_in_flight = len(self._groups)
        if skipped:
            log.warning(
                "%d prompts do not fit max_model_len=%d; dropped: %s",
                len(skipped),
                eng.max_model_len,
                skipped[:5],
            )
            self.metrics.prompts_skipped.inc(len(skipped))
            assert self._queue is not None
            self._redis_call.retry(
                lambda: self._queue.done(self.actor_id, skipped), "mark skipped prompts done"
            )
        return groups

    def _submit(self, groups: list[Group]) -> None:
        s, eng = self.settings, self.engine
        for group in groups:
            if self._stop.is_set():  # stop() gives back the groups not submitted
                return
            group.version = eng.version
            with self._lock:
                self._in_engine += s.n_samples_per_prompt
                self._engine_empty.clear()
                if s.sync:
                    counts = self._sync_counts
                    counts[group.version] = counts.get(group.version, 0) + s.n_samples_per_prompt
                    for old in [v for v in counts if v < group.version]:
                        del counts[old]
            try:
                group.request_id = eng.submit(
                    group.ids,
                    self._on_done(group),
                    n=s.n_samples_per_prompt,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    max_tokens=s.max_tokens,
                )
            except Exception as e:  # noqa: BLE001  (the prompt goes back; the others continue)
                self._on_done(group)(None, e)
        if self.metrics.state in ("idle", "starting", "waiting_for_weights"):
            self.metrics.state = "running"

    def _on_done(self, group: Group) -> Callable[[Completion | None, BaseException | None], None]:
        """Engine callback (driver thread): hand the group to the post thread and let the feed thread refill."""

        def done(completion: Completion | None, error: BaseException | None) -> None:
            if group.done.is_set():
                return
            group.completion, group.error = completion, error
            group.done.set()
            n = self.settings.n_samples_per_prompt
            with self._lock:
                self._in_engine -= n
                if self._in_engine <= 0:
                    self._engine_empty.set()
                if id(group) in self._groups:  # not given back by stop() meanwhile
                    self._waiting += n
            self._finished.put(group)
            self._wake_feed()

        return done

    def _abort_own(self) -> None:
        """On stop: abort this actor's requests still in the engine (their groups are given back)."""
        with self._lock:
            ids = [g.request_id for g in self._groups.values() if g.request_id and not g.done.is_set()]
        if ids:
            log.info("stopping: aborting %d prompts in flight", len(ids))
            try:
                self.engine.abort(ids)
            except Exception as e:  # noqa: BLE001  (engine closed: the prompts are given back anyway)
                log.warning("abort failed: %s", e)

    # ---- post thread ----
    def _post_loop(self) -> None:
        """Grade and insert finished groups; after stop(), finish what is done (or give it back) and exit."""
        while True:
            groups = self._take_over(self._take_finished())
            if not groups:
                if self._stop.is_set() and not self._thread.is_alive():
                    with self._lock:
                        if self._in_engine <= 0:
                            return
                continue
            ok = [g for g in groups if g.completion is not None]
            for g in groups:
                if g.completion is None:
                    if not self._stop.is_set():
                        log.warning("generation of %s failed: %s", g.prompt.prompt_id, g.error)
                        self.metrics.last_error = f"{type(g.error).__name__}: {g.error}"
                    self._give_back_groups([g])
            if not ok:
                continue
            try:
                self._finish(ok)
            except Stopping:
                self._give_back_groups(ok)
            except Exception as e:  # keep going: the prompts return to the queue
                log.exception("grading/inserting failed; giving the prompts back")
                self.metrics.last_error = f"{type(e).__name__}: {e}"
                self._give_back_groups(ok)

    def _take_over(self, groups: list[Group]) -> list[Group]:
        """The groups still held (stop() may have given some back), marked as being finished by the post thread."""
        with self._lock:
            held = [g for g in groups if id(g) in self._groups]
            self._finishing.update(id(g) for g in held)
        return held

    def _take_finished(self) -> list[Group]:
        """The finished groups to grade together: all that are ready, and those finishing within GRADE_LINGER_S
        of the first while the engine still runs some (up to MAX_GROUPS_PER_GRADE)."""
        try:
            groups = [self._finished.get(timeout=0.2)]
        except queue.Empty:
            return []
        if not self._stop.is_set():
            # One wait for all of them, cut short when the engine runs empty: a wake-up per finishing group
            # would take the GIL from the engine's driver each time.
            self._engine_empty.wait(GRADE_LINGER_S)
        while len(groups) < MAX_GROUPS_PER_GRADE:
            try:  # the only consumer
                groups.append(self._finished.get_nowait())
            except queue.Empty:
                break
        return groups

    def _finish(self, groups: list[Group]) -> None:
        for g in groups:
            assert g.completion is not None
            self.metrics.record_generation(g.completion.n_tokens, g.completion.latency_s)
        t0 = time.perf_counter()
        results = self._grade(groups)
        grade_s = time.perf_counter() - t0
        self.metrics.grade_latency.observe(grade_s)
        trajectories = to_trajectories(groups, results, grade_s, self.actor_id)
        t0 = time.perf_counter()
        self._insert(trajectories)
        self.metrics.insert_latency.observe(time.perf_counter() - t0)
        assert self._queue is not None
        done_ids = [g.prompt.prompt_id for g in groups]
        self._redis_call.retry(lambda: self._queue.done(self.actor_id, done_ids), "mark prompts done")
        self._release(groups)
        self.metrics.record_inserted(len(trajectories), len(groups))
        if self.metrics.state not in ("stopping", "waiting_for_weights"):
            self.metrics.state = "running"
        self.metrics.last_error = None
        self.batches += 1

    def _grade(self, groups: list[Group]) -> list[GradeResult]:
        """Grade every sample; waits (backoff) while the reward service is unavailable; raises Stopping."""
        items, slots, results = grade_items(groups)
        if not items:
            return results
        delay = 1.0
        while True:
            try:
                graded = self.reward.grade(items)
                break
            except RewardServiceError as e:
                self.metrics.reward_errors.inc()
                if e.status_code is not None and 400 <= e.status_code < 500:
                    # Our request is malformed: retrying cannot help; record the groups as grading errors.
                    log.error("reward service refused a batch (%s); recording status=error", e)
                    return results
                self.metrics.state = "reward_unavailable"
                self.metrics.last_error = f"reward service unavailable: {e}"
                if self._stop.is_set():
                    raise Stopping from e
                log.warning("reward service unavailable (%s); retrying the batch in %.1fs", e, delay)
                self._renew_claims()
                self._stop.wait(delay)
                delay = min(delay * 2, self.settings.reward_max_backoff_s)
        for slot, res in zip(slots, graded, strict=True):
            results[slot] = res
        return results

    def _insert(self, trajectories: list[Trajectory]) -> None:
        """Insert; blocks while the rate limiter says the actors are ahead (backpressure), renewing the prompt
        claims and watching stop() every STOP_POLL_S; raises Stopping. Inserts are idempotent per trajectory id,
        so the retries may resend the whole list (encoded once: encoding is most of an insert's time)."""
        assert self._table is not None
        table, wait_s, waited = self._table, min(self.settings.insert_timeout_s, STOP_POLL_S), 0.0
        encoded = table.encode_batch(trajectories)
        while True:
            try:
                self._redis_call.retry(lambda: table.insert_encoded(encoded, timeout_s=wait_s), "insert")
                return
            except RateLimitTimeout as e:
                if self._stop.is_set():
                    raise Stopping from e
                self._renew_claims()
                waited += wait_s
                if waited >= self.settings.insert_timeout_s:  # one wait of insert_timeout_s: count it
                    waited = 0.0
                    self.metrics.backpressure_waits.inc()
                    self.metrics.state = "backpressure"
                    log.info("buffer rate limiter blocks inserts (learner behind); waiting")

    # ---- catch-up from the announced file ----
    def _latest_version(self) -> int | None:
        """The announced latest version after catching up to it; read from Redis at most every CATCH_UP_EVERY_S
        (every call in sync mode, where sampling waits for it)."""
        now = time.monotonic()
        if self.settings.sync or now - self._latest_at >= CATCH_UP_EVERY_S:
            self._latest = self._catch_up()
            self._latest_at = now
        return self._latest

    def _catch_up(self) -> int | None:
        """Load the announced latest weights from their path if newer and readable; returns the latest version."""
        assert self._weights is not None
        info = self._redis_call.retry(self._weights.latest, "read latest weights")
        if info is None:
            return None
        load_s = catch_up(self.engine, info, self._failed_catch_up, self.settings.max_header_bytes)
        if load_s is not None:
            self.metrics.record_update(info.version, load_s)
        return info.version

    # ---- prompts in flight ----
    def _release(self, groups: list[Group] | None = None, *, keep_finishing: bool = False) -> list[Group]:
        """Stop holding `groups` (None: every group held, but with `keep_finishing` not those the post thread is
        inserting); returns those that were still held, so that each group is finished or given back once."""
        n = self.settings.n_samples_per_prompt
        with self._lock:
            if groups is None:
                groups = [g for k, g in self._groups.items() if not (keep_finishing and k in self._finishing)]
            released = [g for g in groups if self._groups.pop(id(g), None) is not None]
            for g in released:
                self._finishing.discard(id(g))
                if g.done.is_set():
                    self._waiting -= n
            self.metrics.prompts_in_flight = len(self._groups)
        if released:
            self._wake_feed()  # fewer sequences wait for insertion
        return released

    def _give_back_groups(self, groups: list[Group] | None, *, keep_finishing: bool = False) -> None:
        """Return the prompts to the queue (None: all held, see `_release`); in sync mode their trajectories are
        generated again."""
        released = self._release(groups, keep_finishing=keep_finishing)
        if self.settings.sync:
            with self._lock:
                for g in released:
                    if g.version in self._sync_counts:
                        self._sync_counts[g.version] -= self.settings.n_samples_per_prompt
        prompts = [g.prompt for g in released]
        if prompts and self._queue is not None:
            queue_ = self._queue
            if self._redis_call.bounded(
                lambda: queue_.give_back(self.actor_id, prompts), "give back prompts"
            ):
                self.metrics.prompts_given_back.inc(len(prompts))
                log.info("gave %d unfinished prompts back to the queue", len(prompts))

    def _give_back_all(self, *, keep_finishing: bool = False) -> None:
        self._give_back_groups(None, keep_finishing=keep_finishing)

    def _renew_claims(self) -> None:
        """Extend the claims of every prompt held to `prompt_lease_s` from now, at most every third of it (from the
        heartbeat and while waiting on the buffer or the reward service), so no other actor is served prompts this
        live actor still holds; a dead actor stops renewing and its claims expire."""
        lease = self.settings.prompt_lease_s
        if self._queue is None or time.monotonic() - self._renewed_at < lease / 3:
            return
        with self._lock:
            ids = [g.prompt.prompt_id for g in self._groups.values()]
        try:
            renewed = self._queue.renew(self.actor_id, ids, lease)
        except REDIS_ERRORS as e:
            log.warning("renewing %d prompt claims failed: %s", len(ids), e)
            return
        self._renewed_at = time.monotonic()
        if renewed < len(ids):
            log.warning("%d of %d prompt claims had expired before renewal", len(ids) - renewed, len(ids))
