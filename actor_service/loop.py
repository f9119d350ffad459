"""The sampling loop of an actor: prompt queue -> chat template -> vLLM (n samples, log-probs) -> reward -> buffer.

Two background threads of the actor service, without pause:

    generate thread: pop B prompts (claimed with a TTL, never handed to two actors) -> generate n samples each under
        the engine lock (policy_version at start and end) -> hand the batch over (one slot)
    post thread:     grade the B*n responses in one reward call -> insert B*n Trajectories (blocks on the buffer's
        rate limiter: backpressure) -> mark the prompts done

so grading and inserting batch k overlap generating batch k+1, and the engine never runs more than one batch
ahead of what the buffer accepted.

Failure behaviour:
- reward service down (transport error / 5xx after the client's own retries): wait with exponential backoff and
  retry the same batch; the prompts stay claimed by this actor meanwhile (nothing is lost).
- Redis down: every Redis call waits and retries (redis-py reconnects on the next command).
- stop() (SIGTERM via uvicorn's shutdown): take no new prompts; a batch in flight is finished if grading and
  inserting succeed promptly, otherwise its prompts are given back to the queue; then deregister.
- Weights: pushes arrive over HTTP (actor_service.app) and are applied between generate calls by the engine lock.
  At start, and before each batch, a newer version announced in the WeightsStore is loaded from its path when this
  machine can read it (catch-up after a restart). With `sync`, no batch starts until the engine holds the
  announced version, and the actor generates exactly `prompts_per_batch x n_samples_per_prompt` trajectories per
  version (one learner batch when sized so: `tbrm up --sync` does), then waits for the next version: the
  on-policy baseline wastes no generation (prompts skipped as too long are made up for by the next pop; a batch
  given back after a failed insert is generated again).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis as redis_lib

from actor_service.engine import ActorEngine, Generation, VersionConflict, WeightsApplyError
from actor_service.metrics import ActorMetrics
from actor_service.settings import ActorSettings
from actor_service.weights import WeightsFormatError, WeightsMismatchError, check_against, read_header
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
from reward.schema import MAX_GOLD_CHARS, MAX_RESPONSE_CHARS, GradeItem, GradeResult

log = logging.getLogger(__name__)

T = TypeVar("T")
_REDIS_ERRORS = (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError)


class _Stopping(Exception):
    """Raised inside the loop when stop() was requested while waiting on a dependency."""


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
        self.reward = reward_client or RewardClient(settings.reward_url, timeout_s=settings.reward_timeout_s,
                                                    retries=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"actor-loop-{self.actor_id}", daemon=True)
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="actor-heartbeat", daemon=True)
        self._inflight: dict[int, list[Prompt]] = {}  # batch number -> prompts claimed and not yet done
        self._inflight_lock = threading.Lock()
        # Generated batches waiting for grading + insertion. One slot: the engine generates batch k+1 while batch
        # k is graded and inserted (hides the reward/buffer latency), but never runs further ahead, so the
        # buffer's backpressure reaches the engine after one batch.
        self._post_q: queue.Queue[tuple[int, list[tuple[Prompt, list[int]]], Generation]] = queue.Queue(maxsize=1)
        self._post_thread = threading.Thread(target=self._post_loop, name="actor-post", daemon=True)
        self._batch_seq = 0
        self._redis: redis_lib.Redis | None = None
        self._queue: PromptQueue | None = None
        self._table: ReplayTable | None = None
        self._registry: ActorRegistry | None = None
        self._weights: WeightsStore | None = None
        self._registered = False
        self._failed_catch_up: set[int] = set()
        self._sync_lock = threading.Lock()
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
        """Stop taking prompts, finish or give back the batch in flight, deregister. Safe to call twice."""
        if timeout_s is None:
            timeout_s = 2 * self.settings.reward_timeout_s + self.settings.insert_timeout_s + 60.0
        self._stop.set()
        self.metrics.state = "stopping"
        deadline = time.monotonic() + timeout_s
        for thread in (self._thread, self._post_thread):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.error("%s did not stop within %.0fs; giving its prompts back", thread.name, timeout_s)
        self._give_back_inflight()
        if self._hb_thread.is_alive():
            self._hb_thread.join(self.settings.heartbeat_interval_s + 5.0)
        if self._registered and self._registry is not None:
            self._bounded(lambda: self._registry.deregister(self.actor_id), "deregister")
            self._registered = False
        self.reward.close()
        if self._redis is not None:
            self._redis.close()
        self.metrics.state = "stopped"
        log.info("actor %s stopped after %d batches", self.actor_id, self.batches)

    # ---- redis plumbing ----
    def _retry_redis(self, fn: Callable[[], T], what: str) -> T:
        """Call fn until Redis answers; waits with backoff while it is down. Always tries at least once (so a
        batch finishing during shutdown still gets inserted), then raises _Stopping if stop() was requested."""
        delay = 0.2
        while True:
            try:
                result = fn()
                if self.metrics.state == "redis_unavailable":
                    log.info("redis is back (%s)", what)
                    self.metrics.state = "running"
                return result
            except _REDIS_ERRORS as e:
                self.metrics.redis_errors.inc()
                self.metrics.state = "redis_unavailable"
                self.metrics.last_error = f"redis unavailable during {what}: {type(e).__name__}: {e}"
                if self._stop.is_set():
                    raise _Stopping from e
                log.warning("%s; retrying in %.1fs", self.metrics.last_error, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _bounded(self, fn: Callable[[], object], what: str, attempts: int = 5) -> bool:
        """A few attempts regardless of stop (for give-back/deregister during shutdown)."""
        for i in range(attempts):
            try:
                fn()
                return True
            except _REDIS_ERRORS as e:
                log.warning("%s failed (attempt %d/%d): %s", what, i + 1, attempts, e)
                time.sleep(min(0.2 * 2**i, 2.0))
        log.error("%s failed after %d attempts", what, attempts)
        return False

    def _connect(self) -> None:
        self._redis = connect(self.settings.redis_url)
        r = self._redis
        self._queue = PromptQueue(r, self.settings.prompt_queue)
        self._registry = ActorRegistry(r)
        self._weights = WeightsStore(r)
        self._table = self._retry_redis(lambda: ReplayTable(r, self.settings.table), "open the replay table")

    def _info(self) -> ActorInfo:
        tok_s, _ = self.metrics.rates()
        return ActorInfo(
            actor_id=self.actor_id, url=self.settings.resolved_public_url(), policy_version=self.engine.version,
            started_at=self._started_at, tokens_per_s=tok_s, trajectories=self.metrics.total_trajectories,
            status=self.metrics.state,
        )

    def _register(self) -> None:
        assert self._registry is not None
        self._retry_redis(lambda: self._registry.register(self._info(), ttl_s=self.settings.registry_ttl_s),
                          "register")
        self._registered = True
        log.info("registered actor %s at %s", self.actor_id, self.settings.resolved_public_url())

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            assert self._registry is not None
            try:
                tok_s, _ = self.metrics.rates()
                self._registry.heartbeat(
                    self.actor_id, ttl_s=self.settings.registry_ttl_s, policy_version=self.engine.version,
                    tokens_per_s=tok_s, trajectories=self.metrics.total_trajectories, status=self.metrics.state,
                )
            except KeyError:  # expired while Redis was away (or flushed): register again
                try:
                    self._registry.register(self._info(), ttl_s=self.settings.registry_ttl_s)
                except _REDIS_ERRORS as e:
                    log.warning("re-register failed: %s", e)
            except _REDIS_ERRORS as e:
                log.warning("heartbeat failed: %s", e)

    # ---- main loop ----
    def _run(self) -> None:
        try:
            self._connect()
            self._register()
            self._hb_thread.start()
            self._post_thread.start()
            self._catch_up()
        except _Stopping:
            return
        self.metrics.state = "running"
        while not self._stop.is_set():
            batch_no = -1
            try:
                if not self._ready_to_sample():
                    self._stop.wait(self.settings.idle_sleep_s)
                    continue
                assert self._queue is not None
                want = self._prompts_to_pop()
                prompts = self._retry_redis(
                    lambda want=want: self._queue.pop(want, self.actor_id, lease_s=self.settings.prompt_lease_s),
                    "pop prompts",
                )
                if not prompts:
                    if self.metrics.prompts_in_flight == 0:
                        self.metrics.state = "idle"
                    self._stop.wait(self.settings.idle_sleep_s)
                    continue
                self._batch_seq += 1
                batch_no = self._batch_seq
                self._track(batch_no, list(prompts))
                generated = self._generate(batch_no, prompts)
                if generated is not None:
                    self._hand_over(generated)
            except _Stopping:
                break
            except Exception as e:  # noqa: BLE001  (keep sampling: a bad batch must not kill the actor)
                log.exception("sampling batch failed; giving its prompts back")
                self.metrics.last_error = f"{type(e).__name__}: {e}"
                self._give_back_batch(batch_no)
                self._stop.wait(1.0)

    def _hand_over(self, item: tuple[int, list[tuple[Prompt, list[int]]], Generation]) -> None:
        """Queue a generated batch for the post thread; waits while the slot is taken (backpressure)."""
        while True:
            try:
                self._post_q.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self._post_thread.is_alive():
                    raise RuntimeError("post-processing thread died") from None

    def _post_loop(self) -> None:
        """Grade and insert generated batches; after stop(), finish what is queued (or give it back) and exit."""
        while True:
            try:
                batch_no, batch, gen = self._post_q.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set() and not self._thread.is_alive():
                    return
                continue
            try:
                self._finish(batch_no, batch, gen)
            except _Stopping:
                self._give_back_batch(batch_no)
            except Exception as e:  # noqa: BLE001  (keep going: the prompts return to the queue)
                log.exception("grading/inserting a batch failed; giving its prompts back")
                self.metrics.last_error = f"{type(e).__name__}: {e}"
                self._give_back_batch(batch_no)
                self._sync_count(gen.version_start, -len(batch) * self.settings.n_samples_per_prompt)

    def _ready_to_sample(self) -> bool:
        """Catch up to announced weights; in sync mode, only sample on the announced version, one batch each."""
        latest = self._catch_up()
        behind = latest is not None and self.engine.version < latest
        if self.settings.sync and (behind or self._prompts_to_pop() == 0):
            if self.metrics.state != "waiting_for_weights":
                log.info("sync mode: waiting for weights version %d (have %d)",
                         latest if behind else self.engine.version + 1, self.engine.version)
            self.metrics.state = "waiting_for_weights"
            return False
        return True

    def _prompts_to_pop(self) -> int:
        """Prompts for the next batch; in sync mode what is left of this version's one batch (0 = wait)."""
        s = self.settings
        if not s.sync:
            return s.prompts_per_batch
        with self._sync_lock:
            done = self._sync_counts.get(self.engine.version, 0)
        return max(0, s.prompts_per_batch - done // s.n_samples_per_prompt)

    def _sync_count(self, version: int, trajectories: int) -> None:
        """Sync mode: record trajectories generated with `version` (negative: given back, to be redone)."""
        if not self.settings.sync:
            return
        with self._sync_lock:
            self._sync_counts[version] = self._sync_counts.get(version, 0) + trajectories
            for old in [v for v in self._sync_counts if v < self.engine.version]:
                del self._sync_counts[old]

    def _catch_up(self) -> int | None:
        """Load the announced latest weights from their path if newer and readable; returns the latest version."""
        assert self._weights is not None
        info = self._retry_redis(self._weights.latest, "read latest weights")
        if info is None or info.version <= self.engine.version:
            return None if info is None else info.version
        if info.version in self._failed_catch_up or not info.path:
            return info.version
        path = Path(info.path)
        try:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is not readable here")
            digest = _sha256(path)
            if digest != info.sha256:
                raise WeightsFormatError(f"sha256 of {path} is {digest}, WeightsStore says {info.sha256}")
            check_against(read_header(path, self.settings.max_header_bytes), self.engine.spec, self.engine.optional)
            load_s = self.engine.update_weights(path, info.version, move=False)
        except VersionConflict:
            return info.version  # a push landed meanwhile
        except (OSError, WeightsFormatError, WeightsMismatchError, WeightsApplyError) as e:
            self._failed_catch_up.add(info.version)
            log.warning("cannot catch up to weights version %d from %s (%s); waiting for a push",
                        info.version, path, e)
            return info.version
        self.metrics.record_update(info.version, load_s)
        log.info("caught up to weights version %d from %s", info.version, path)
        return info.version

    def _generate(
        self, batch_no: int, prompts: list[Prompt]
    ) -> tuple[int, list[tuple[Prompt, list[int]]], Generation] | None:
        s, eng = self.settings, self.engine
        system = s.system_prompt or None
        batch: list[tuple[Prompt, list[int]]] = []
        skipped: list[str] = []
        for p in prompts:
            ids = eng.chat_token_ids(p.messages, system)
            if eng.fits(ids):
                batch.append((p, ids))
            else:
                skipped.append(p.prompt_id)
        if skipped:
            log.warning("%d prompts do not fit max_model_len=%d; dropped: %s", len(skipped), eng.max_model_len,
                        skipped[:5])
            self.metrics.prompts_skipped.inc(len(skipped))
            assert self._queue is not None
            self._retry_redis(lambda: self._queue.done(self.actor_id, skipped), "mark skipped prompts done")
        if not batch:
            self._untrack(batch_no)
            return None
        if self.metrics.state in ("idle", "starting", "waiting_for_weights"):
            self.metrics.state = "running"
        gen = eng.generate([ids for _, ids in batch], n=s.n_samples_per_prompt, temperature=s.temperature,
                           top_p=s.top_p, max_tokens=s.max_tokens)
        self._sync_count(gen.version_start, len(batch) * s.n_samples_per_prompt)
        self.metrics.record_generation(gen.n_tokens, gen.latency_s)
        return batch_no, batch, gen

    def _finish(self, batch_no: int, batch: list[tuple[Prompt, list[int]]], gen: Generation) -> None:
        t0 = time.perf_counter()
        results = self._grade(batch, gen)
        grade_s = time.perf_counter() - t0
        self.metrics.grade_latency.observe(grade_s)
        trajectories = self._trajectories(batch, gen, results, grade_s)
        t0 = time.perf_counter()
        self._insert(trajectories)
        self.metrics.insert_latency.observe(time.perf_counter() - t0)
        assert self._queue is not None
        done_ids = [p.prompt_id for p, _ in batch]
        self._retry_redis(lambda: self._queue.done(self.actor_id, done_ids), "mark prompts done")
        self._untrack(batch_no)
        self.metrics.record_inserted(len(trajectories), len(batch))
        self.metrics.state = "running"
        self.metrics.last_error = None
        self.batches += 1

    def _grade(self, batch: list[tuple[Prompt, list[int]]], gen: Generation) -> list[GradeResult]:
        """Grade every sample; waits (backoff) while the reward service is unavailable; raises _Stopping."""
        items: list[GradeItem] = []
        slots: list[int] = []  # index into the flat sample list of each gradable item
        results: list[GradeResult] = []
        for (p, _), group in zip(batch, gen.samples, strict=True):
            for smp in group:
                if len(p.gold) > MAX_GOLD_CHARS:
                    results.append(GradeResult(score=0.0, status="error", extracted=None))
                    continue
                # The final answer sits at the end of a response: keep the tail of an overlong one.
                items.append(GradeItem(response=smp.text[-MAX_RESPONSE_CHARS:], gold=p.gold))
                slots.append(len(results))
                results.append(GradeResult(score=0.0, status="error", extracted=None))
        if not items:
            return results
        delay = 1.0
        while True:
            try:
                graded = self.reward.grade(items)
                break
            except RewardServiceError as e:
                if e.status_code is not None and 400 <= e.status_code < 500:
                    # Our request is malformed: retrying cannot help; record the batch as grading errors.
                    log.error("reward service refused a batch (%s); recording status=error", e)
                    self.metrics.reward_errors.inc()
                    return results
                self.metrics.reward_errors.inc()
                self.metrics.state = "reward_unavailable"
                self.metrics.last_error = f"reward service unavailable: {e}"
                if self._stop.is_set():
                    raise _Stopping from e
                log.warning("reward service unavailable (%s); retrying the batch in %.1fs", e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.settings.reward_max_backoff_s)
        for slot, res in zip(slots, graded, strict=True):
            results[slot] = res
        return results

    def _trajectories(
        self, batch: list[tuple[Prompt, list[int]]], gen: Generation, results: list[GradeResult], grade_s: float
    ) -> list[Trajectory]:
        out: list[Trajectory] = []
        k = 0
        for (p, ids), group in zip(batch, gen.samples, strict=True):
            group_id = uuid.uuid4().hex
            prompt_text = self.engine.decode(ids, skip_special_tokens=False)
            for smp in group:
                res = results[k]
                k += 1
                out.append(Trajectory(
                    prompt_id=p.prompt_id, group_id=group_id, prompt_token_ids=ids,
                    response_token_ids=smp.token_ids, behaviour_logprobs=smp.logprobs, prompt_text=prompt_text,
                    response_text=smp.text, finish_reason=smp.finish_reason, reward=res.score,
                    grade_status=res.status, extracted=res.extracted, gold=p.gold, data_source=p.data_source,
                    policy_version=gen.version_start, policy_version_end=gen.version_end, actor_id=self.actor_id,
                    gen_latency_s=gen.latency_s, grade_latency_s=grade_s,
                ))
        return out

    def _insert(self, trajectories: list[Trajectory]) -> None:
        """Insert; blocks while the rate limiter says the actors are ahead (backpressure); raises _Stopping."""
        assert self._table is not None
        while True:
            try:
                self._retry_redis(
                    lambda: self._table.insert(trajectories, timeout_s=self.settings.insert_timeout_s), "insert"
                )
                return
            except RateLimitTimeout as e:
                self.metrics.backpressure_waits.inc()
                if self._stop.is_set():
                    raise _Stopping from e
                self.metrics.state = "backpressure"
                log.info("buffer rate limiter blocks inserts (learner behind); waiting")

    # ---- prompts in flight ----
    def _track(self, batch_no: int, prompts: list[Prompt]) -> None:
        with self._inflight_lock:
            self._inflight[batch_no] = prompts
            self.metrics.prompts_in_flight = sum(len(v) for v in self._inflight.values())

    def _untrack(self, batch_no: int) -> list[Prompt]:
        with self._inflight_lock:
            prompts = self._inflight.pop(batch_no, [])
            self.metrics.prompts_in_flight = sum(len(v) for v in self._inflight.values())
        return prompts

    def _give_back(self, prompts: list[Prompt]) -> None:
        if prompts and self._queue is not None:
            queue_ = self._queue
            if self._bounded(lambda: queue_.give_back(self.actor_id, prompts), "give back prompts"):
                self.metrics.prompts_given_back.inc(len(prompts))
                log.info("gave %d unfinished prompts back to the queue", len(prompts))

    def _give_back_batch(self, batch_no: int) -> None:
        self._give_back(self._untrack(batch_no))

    def _give_back_inflight(self) -> None:
        with self._inflight_lock:
            batches = list(self._inflight)
        for batch_no in batches:
            self._give_back_batch(batch_no)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
