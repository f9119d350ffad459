"""What only rank 0 does, behind one object: the training log, deferred acks, priorities, export and push, the
metrics line, the status stores and the final publish. Rank 0 gets `RankZeroServices`; every other rank gets
the base `RankServices`, whose methods do nothing, so the loop (learner/train.py) has no `if rank == 0` branches.

The other ranks still train, checkpoint and roll back with rank 0; they never talk to actors or write metrics."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from buffer.client import ActorRegistry, BatchStream, LearnerStatusStore, ReplayTable, WeightsStore
from buffer.schema import LearnerStatus, SampledItem, WeightsInfo
from learner.acks import PendingAcks, ack_checkpointed, ack_lease, redis_retry
from learner.batch import Batch, batch_metrics, sample_batch, stream_batch
from learner.checkpoints import StalenessRecovery, TrainingLog
from learner.export import WeightExporter
from learner.live import LiveStatus
from learner.metrics import BATCH_REWARD_MEAN, GRAD_CLIPPED, VERSION_LAG_MEAN, replay_usage
from learner.push import PushFn, WeightPusher
from learner.replay import write_priorities
from learner.tracking import open_metrics_log

if TYPE_CHECKING:
    from learner.train import LearnerState

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WEIGHTS_DIR = "weights"
BUFFER_STATS_EVERY_STEPS = 10  # reuse / never-trained figures: one stats call per 10 steps, not per step


@dataclass
class StepReport:
    """One trained step, as the metrics line reports it."""

    items: list[SampledItem]
    trained: dict[str, tuple[float, float, float]]
    """Per trained item id: (residual, log pi/pi_ref, log pi/mu), gathered from every rank."""
    loss_metrics: dict[str, float]
    replay: dict[str, float]
    response: str | None
    grad_norm: float | None
    n_ref: int
    n_micro: int
    n_padding: int
    n_tokens: int
    t0: float
    t_sampled: float
    t_ref: float
    t_step: float
    export_blocking_s: float = 0.0


class RankServices:
    """The services as the loop calls them. This base serves ranks > 0: every service is rank 0's, so its methods
    do nothing; `RankZeroServices` overrides them."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        """The metrics lines written (rank 0 only)."""
        self.pending: PendingAcks | None = None
        """Leases of trained batches held until a checkpoint (rank 0, with deferred acks)."""
        self.table: ReplayTable | None = None
        """The replay table, for the guard's acks (rank 0)."""

    def version_floor(self) -> int:
        """The lowest next policy version the actors allow (an actor may hold a newer lineage; learner/push.py)."""
        return 0

    def writer(self, table: ReplayTable) -> ReplayTable | BatchStream:
        """Where this rank's reference log-probs are cached: its table (rank 0 streaming: its `BatchStream`)."""
        return table

    def start(self, state: LearnerState) -> None: ...
    def sample(self, state: LearnerState, stop: threading.Event) -> Batch | None: return None
    def publish(self, version: int) -> WeightsInfo | None: return None
    def books_step(self, state: LearnerState, items: list[SampledItem], leases: list[str]) -> None: ...
    def ack(self, leases: list[str], n_items: int) -> None: ...
    def replay_feedback(self, state: LearnerState, trained: dict[str, Any], replay: dict[str, float]) -> None: ...
    def export(self, version: int) -> float: return 0.0
    def catch_up(self, refresh: bool = False) -> None: ...
    def record(self, state: LearnerState, report: StepReport) -> None: ...
    def checkpointed(self, step: int, version: int) -> None: ...
    def ack_held(self) -> None: ...
    def fail(self, state: LearnerState) -> None: ...
    def close_metrics(self) -> None: ...
    def finish(self, state: LearnerState) -> None: ...


class RankZeroServices(RankServices):
    """Rank 0: owns the training log, the pending acks, the exporter and pusher, the metrics log and the status."""

    def __init__(self, state: LearnerState, live: LiveStatus, push_fn: PushFn | None) -> None:
        settings, redis, table = state.settings, state.redis, state.table
        super().__init__()
        self.settings, self.table, self.live = settings, table, live
        self.recovery = StalenessRecovery(
            table, state.rolled_back, None if settings.sync else table.config.max_staleness_versions
        )
        self.books = TrainingLog(state.run_dir)
        self.weights_store = WeightsStore(redis)
        self.status_store = LearnerStatusStore(redis)
        self.pusher = WeightPusher(
            ActorRegistry(redis).live, settings.auth_token, timeout_s=settings.push_timeout_s,
            retry_s=settings.push_retry_s, workers=settings.push_workers, push_fn=push_fn,
            canary_max_drift=settings.canary_max_drift, fanout=settings.push_fanout,
        )
        # snapshot on this thread, export + push on the exporter's while the next step runs (learner/export.py)
        self.exporter = WeightExporter(
            state.engine.module, state.run_dir / WEIGHTS_DIR, keep=settings.keep_weights,
            dtype=settings.export_dtype, publish=self.weights_store.set_latest, pusher=self.pusher,
        )
        self.metrics_file = open_metrics_log(state.run_dir, settings, METRICS_FILE)  # + TensorBoard/W&B/MLflow
        # async mode: sampling, acks, priorities and reference caches in one round trip per step (learner/batch.py)
        self.stream = None if settings.sync else BatchStream(
            table, settings.batch_size, lease_s=settings.lease_s, timeout_s=settings.sample_timeout_s)
        self.pending = self._deferred_acks()
        self.latest: WeightsInfo | None = None

    def _deferred_acks(self) -> PendingAcks | None:
        """Leases held until a checkpoint holds their update (learner/acks.py), when the settings ask for it."""
        settings, cfg = self.settings, self.table.config
        if not (settings.ack_after_checkpoint and settings.checkpoint_interval_steps and cfg.max_times_sampled == 1):
            return None
        held = (settings.checkpoint_interval_steps + 1) * settings.batch_size
        if held > cfg.max_size // 2:
            log.warning(
                "up to %d trajectories stay leased until the next checkpoint ((checkpoint_interval_steps + 1) x "
                "batch_size, with the prefetched batch), more than half the table's max_size=%d: lower "
                "checkpoint_interval_steps",
                held, cfg.max_size,
            )
        return PendingAcks(self.table, settings.lease_s or cfg.lease_s)

    def version_floor(self) -> int:
        return self.pusher.version_floor

    def writer(self, table: ReplayTable) -> ReplayTable | BatchStream:
        return self.stream or table

    def start(self, state: LearnerState) -> None:
        """Publish a resumed learner's weights (it is ahead of fresh actors), log the start, report `running`."""
        if state.version > 0:
            self.latest = self.publish(state.version)
        self.pusher.sync(self.latest)
        self.books.start(state.step, state.version, state.resumed_from)
        self.live.update(state="running", step=state.step, policy_version=state.version, latest_weights=self.latest)
        self.status_store.set(LearnerStatus(step=state.step, policy_version=state.version, state="running"))

    def sample(self, state: LearnerState, stop: threading.Event) -> Batch | None:
        """The step's batch (and the lease of the next one, trained at the next version); while waiting for data,
        lagging actors are caught up."""
        version = self.recovery.sampling_version(state.version)
        on_wait = lambda w=self.latest: self.pusher.sync(w)  # noqa: E731
        if self.stream is None:
            return sample_batch(self.table, self.settings, version, stop, on_wait=on_wait)
        lease_version = self.recovery.sampling_version(state.version + 1)
        return stream_batch(self.stream, self.settings, version, lease_version, stop, on_wait=on_wait)

    def publish(self, version: int) -> WeightsInfo | None:
        """Export the current weights as version `version`, record them in Redis and push them; waits."""
        return self.exporter.publish_now(version)

    def books_step(self, state: LearnerState, items: list[SampledItem], leases: list[str]) -> None:
        self.books.step(state.step, state.version, items, leases)
        self.recovery.seen(items)

    def ack(self, leases: list[str], n_items: int) -> None:
        """Consume the trained batch: at the next checkpoint (deferred acks) or now; streaming, the acks (and the
        renewal of newly held leases) go with the next step's round trip."""
        if self.pending is not None and self.stream is not None:
            self.pending.add(leases, n_items, renew_now=False)
            pending = self.pending
            self.stream.renew(leases, pending.lease_s, on_reply=lambda alive, n=len(leases): pending.renewed(n, alive))
            return
        if self.pending is not None:
            self.pending.add(leases, n_items)
            return
        if self.stream is not None:
            self.stream.ack(leases, n_items)
            return
        acked = sum(ack_lease(self.table, lease) for lease in leases)
        if acked < n_items:
            # the lease expired during the step: those items went back and may be trained on again
            log.warning("only %d of %d items acked: raise lease_s above the step time", acked, n_items)

    def replay_feedback(self, state: LearnerState, trained: dict[str, Any], replay: dict[str, float]) -> None:
        """Priorities back to the buffer; every few steps the buffer-wide usage ratios into `replay`."""
        if state.write_priorities:
            write_priorities(self.stream or self.table, trained, self.settings.priorities.eps)
        if state.step % BUFFER_STATS_EVERY_STEPS == 0:
            replay.update(replay_usage(self.table.stats().model_dump()))

    def export(self, version: int) -> float:
        """Snapshot the weights for the exporter thread; returns the seconds it blocked the training thread."""
        t = time.monotonic()
        self.exporter.submit(version)
        return time.monotonic() - t

    def catch_up(self, refresh: bool = False) -> None:
        """Push the newest weights to the actors that lag them (`refresh`: re-read the newest from Redis)."""
        self.latest = self.weights_store.latest() if refresh else (self.exporter.latest or self.latest)
        self.pusher.sync(self.latest)

    def record(self, state: LearnerState, report: StepReport) -> None:
        """The step's metrics line: `metrics.jsonl` (+ trackers), the status app and `LearnerStatusStore`."""
        line = self._line(state, report)
        self.metrics_file.write(line)
        self.history.append(line)
        numeric = {k: float(v) for k, v in line.items() if isinstance(v, int | float) and v is not None}
        self.live.update(
            step=state.step, policy_version=state.version, last_step_at=time.time(), metrics=numeric,
            latest_weights=self.latest, actors_delivered=self.pusher.delivered(),
            actors_canary_drift=self.pusher.canary_drift(),
        )
        self.status_store.set(
            LearnerStatus(step=state.step, policy_version=state.version, metrics=numeric, state="running")
        )
        log.info(
            "step %d v%d loss %.4g residual %.3g v0 %.3g reward %.3f lag %.1f %.2fs",
            state.step, state.version, line.get("loss", float("nan")), line.get("residual_mean", float("nan")),
            line.get("v0_mean", float("nan")), line[BATCH_REWARD_MEAN], line[VERSION_LAG_MEAN], line["step_time_s"],
        )

    def _line(self, state: LearnerState, r: StepReport) -> dict[str, Any]:
        clip, norm, stats = self.settings.grad_clip, r.grad_norm, self.pusher.stats
        return {
            "step": state.step,
            "policy_version": state.version,
            "time": time.time(),
            **r.loss_metrics,
            **batch_metrics(r.items),
            **r.replay,
            **state.guard.metrics(),
            "guard_response": r.response,
            "grad_norm": norm,
            GRAD_CLIPPED: float(norm is not None and clip is not None and norm > clip),
            "lr": float(state.engine.get_lr()[0]),
            "ref_computed": r.n_ref,
            "micro_batches": r.n_micro,
            "padding_backwards": r.n_padding,
            "tokens": r.n_tokens,
            "tokens_per_s": r.n_tokens / max(r.t_step - r.t_sampled, 1e-9),
            "step_time_s": time.monotonic() - r.t0,
            "sample_time_s": r.t_sampled - r.t0,
            "ref_time_s": r.t_ref - r.t_sampled,
            "train_time_s": r.t_step - r.t_ref,
            "export_blocking_s": r.export_blocking_s,
            **self.exporter.metrics(),
            "canary_drift_max": stats.canary_drift_max,
            "canary_alarms": stats.canary_alarms,
            "push_latency_s": stats.last_latency_s,
            "pushes_ok": stats.pushes_ok,
            "pushes_failed": stats.pushes_failed,
            "unacked_items": self.pending.pending_items if self.pending is not None else 0,
        }

    def checkpointed(self, step: int, version: int) -> None:
        """A checkpoint holds `step`: log it, then ack the leases it covers."""
        self.books.checkpoint(step, version)
        self.ack_held()

    def ack_held(self) -> None:
        """Ack the leases held for a checkpoint (after one, or a rollback that discards their updates)."""
        ack_checkpointed(self.pending, self.stream)

    def fail(self, state: LearnerState) -> None:
        """The loop raised: report `failed`, stop the background threads (unacked leases expire, so their batches
        return to the buffer for the resumed learner)."""
        try:
            self.status_store.set(LearnerStatus(step=state.step, policy_version=state.version, state="failed"))
        except Exception as e2:  # noqa: BLE001  (Redis may be the failure; the original error is raised)
            log.warning("cannot record the failure in Redis: %s", e2)
        self.exporter.close(timeout_s=self.settings.push_timeout_s)
        self.pusher.close()
        if self.pending is not None:
            self.pending.close()
        if self.stream is not None:
            try:  # the acks the policy released, and the prefetched (untrained) batch back to the buffer
                self.stream.close()
            except Exception as e2:  # noqa: BLE001  (Redis may be the failure: the leases expire instead)
                log.warning("cannot send the queued acks or release the prefetched batch: %s", e2)

    def close_metrics(self) -> None:
        self.metrics_file.close()

    def finish(self, state: LearnerState) -> None:
        """After the exit checkpoint: publish and deliver the final weights (pushes in flight finish, each bounded
        by its timeout), report `stopped`. Streaming: the queued acks and writes are sent and the prefetched batch
        is released (its items are sampleable again at once)."""
        self.ack_held()
        if self.stream is not None:
            redis_retry(self.stream.close, "the final acks and the release of the prefetched batch")
        if self.pending is not None:
            self.pending.close()
        if state.version > 0 and (self.latest is None or self.latest.version != state.version):
            self.latest = self.publish(state.version)
        self.pusher.sync(self.latest)
        self.exporter.close(timeout_s=self.settings.push_timeout_s)
        self.pusher.wait_idle(self.settings.push_timeout_s)
        self.pusher.close()
        self.status_store.set(
            LearnerStatus(step=state.step, policy_version=state.version, metrics=self.live.metrics, state="stopped")
        )
        self.live.update(state="stopped", latest_weights=self.latest, actors_delivered=self.pusher.delivered())
