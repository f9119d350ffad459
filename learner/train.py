"""The learner loop: sample from the replay buffer -> reference log-probs -> loss -> step -> ack -> push weights.

`train(settings)` is a short loop over named steps: `setup` (environment, engine, resume, version repair) returns
a `LearnerState`, the rank-aware services (learner/services.py: everything only rank 0 does) start, then
`train_step` runs until `max_steps` or a stop, and `shutdown` checkpoints and publishes the final weights
(`fail` instead when the loop raises).

    python -m learner                       # the service: this loop + the status HTTP server (port 8003)
    torchrun --nproc_per_node 2 -m learner  # data-parallel (gloo on CPU); only rank 0 serves HTTP

Per step (docs/architecture-and-dataflow.md):
 1. rank 0 samples `batch_size` trajectories with a lease; with several ranks it broadcasts the batch and rank r
    trains on items r, r+W, r+2W, ... (one lease, one ack, no duplicates). Async mode streams (learner/batch.py
    `stream_batch`): one Redis round trip per step fetches this batch (leased a step ahead), sends the previous
    step's acks (as far as the ack policy released them), priorities and reference caches, and leases the next
    batch; sync mode samples (`sample_batch`).
 2. items without cached reference log-probs get them from the frozen reference model; they are written back
    (`cache_reference`) so replays of the same item skip the reference forward.
 3. the shard is cut into padded micro-batches; each micro-batch loss is weighted by its share of the global batch
    (learner/accumulate.py `accumulate_gradients`), so the accumulated gradient is exactly the gradient of the loss
    over the whole batch, whatever the micro-batch split or the number of ranks.
 4. DeepSpeed clips the global grad norm and steps; policy_version += 1. Rank 0 acks the batch's lease once a
    checkpoint holds the update (learner/acks.py: the lease is renewed until then, so a crash returns the batch
    to the buffer instead of losing it); without periodic checkpoints right away, i.e. with the next step's
    round trip (a crash before it returns the batch to the buffer: trained again, never lost).
 5. every K steps rank 0 exports safetensors, records them in `WeightsStore` and pushes them to every live actor
    (non-blocking, see learner/push.py); lagging or late actors are caught up after every step.
 6. rank 0 appends one JSON line to `<run_dir>/metrics.jsonl` and updates `LearnerStatusStore`.
 7. every N steps and at exit: a checkpoint (model, optimizer, scheduler, step/version, RNG of every rank) that
    `resume` restores exactly; then rank 0 acks the leases of the steps it covers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_lib
import torch

from buffer.client import ActorRegistry, ReplayTable, WeightsStore, connect
from buffer.schema import PrioritizedSampler
from learner.accumulate import Accumulated, accumulate_gradients, reduce_metrics
from learner.acks import patient_redis
from learner.batch import broadcast_batch, fill_reference, shard_items
from learner.checkpoints import (
    TRAINING_LOG,
    live_actor_versions,
    logged_version,
    next_version,
    read_training_log,
    repair_version,
    rolled_back_items,
    save_checkpoint,
)
from learner.collectives import all_reduce_sum
from learner.engine import build_engine, configure_environment, init_distributed, resume, seed_everything
from learner.guard import StabilityGuard, all_ranks_agree, grad_norm, params_finite, respond, skip_step
from learner.live import LiveStatus
from learner.loss_config import GrpoLossConfig, SftLossConfig
from learner.push import PushFn
from learner.replay import age_metrics, residual_metrics
from learner.services import RankServices, RankZeroServices, StepReport
from learner.settings import LearnerSettings

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainResult:
    step: int
    policy_version: int
    history: list[dict[str, Any]]
    """The metrics lines written by this call (rank 0; empty on other ranks)."""
    model: torch.nn.Module | None = None
    """The trained policy module (for tests and tools; the service exits instead)."""


@dataclass
class LearnerState:
    """Everything the loop carries from step to step (the same on every rank, but for `rank`)."""

    settings: LearnerSettings
    engine: Any
    """The DeepSpeed engine of the policy."""
    ref_model: torch.nn.Module | None
    redis: redis_lib.Redis
    table: ReplayTable
    run_dir: Path
    ckpt_dir: Path
    """`<run_dir>/checkpoints`."""
    rank: int
    world: int
    """Data-parallel ranks (batch_size is divisible by it)."""
    guard: StabilityGuard
    step: int = 0
    """Optimizer steps taken (resumed from the checkpoint)."""
    version: int = 0
    """The policy version of the current weights (repaired at start: never reused)."""
    last_ckpt_step: int = 0
    resumed_from: str | None = None
    """The checkpoint tag this start resumed from."""
    rolled_back: dict[str, int] = field(default_factory=dict)
    """Rank 0: item_id -> policy_version of the items trained after the resumed checkpoint (from the training log)."""

    @property
    def push_every(self) -> int:
        """Export every K steps; every step in sync mode."""
        return 1 if self.settings.sync else self.settings.push_interval_steps

    @property
    def write_priorities(self) -> bool:
        """Whether residuals go back to the buffer as priorities (a prioritized table and a TBRM loss)."""
        return (self.settings.priorities.enabled and isinstance(self.table.config.sampler, PrioritizedSampler)
                and not isinstance(self.settings.loss, GrpoLossConfig | SftLossConfig))


def setup(settings: LearnerSettings) -> LearnerState:
    """Environment, process group, seed, engine, resume from the newest checkpoint, then the version repair:
    never reuse a version number for other weights, whatever this start resumed from (learner/checkpoints.py)."""
    configure_environment()
    rank, world = init_distributed(settings)
    seed_everything(settings.seed)
    run_dir = Path(settings.run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine, ref_model = build_engine(settings, world)
    step, version, tag = resume(engine, ckpt_dir, settings, rank)
    # Every rank talks to Redis (each caches the reference log-probs of its own shard); rank 0 owns the rest.
    redis = patient_redis(connect(settings.redis_url))
    table = ReplayTable(redis, settings.table)
    records = read_training_log(run_dir / TRAINING_LOG) if rank == 0 else []  # rank 0 writes it; read once
    version = repair_version(
        version, WeightsStore(redis).latest(), live_actor_versions(ActorRegistry(redis)), world,
        logged_version(records),
    )
    return LearnerState(
        settings=settings, engine=engine, ref_model=ref_model, redis=redis, table=table, run_dir=run_dir,
        ckpt_dir=ckpt_dir, rank=rank, world=world, guard=StabilityGuard(settings.guard), step=step,
        version=version, last_ckpt_step=step, resumed_from=tag, rolled_back=rolled_back_items(records, step),
    )


def train(
    settings: LearnerSettings,
    stop: threading.Event | None = None,
    live: LiveStatus | None = None,
    push_fn: PushFn | None = None,
) -> TrainResult:
    """Run the learner until `max_steps` or `stop` is set; returns the final step/version and metrics history."""
    stop = stop or threading.Event()
    live = live or LiveStatus()
    state = setup(settings)
    services = RankZeroServices(state, live, push_fn) if state.rank == 0 else RankServices()
    services.start(state)
    log.info("learner rank %d/%d ready at step %d (loss %s)", state.rank, state.world, state.step, settings.loss.kind)
    try:
        while settings.max_steps is None or state.step < settings.max_steps:
            if not train_step(state, services, stop):
                break
    except BaseException as e:
        live.update(state="failed", error=repr(e))
        services.fail(state)
        raise
    finally:
        services.close_metrics()
    shutdown(state, services)
    return TrainResult(step=state.step, policy_version=state.version, history=services.history,
                       model=state.engine.module)


def train_step(state: LearnerState, services: RankServices, stop: threading.Event) -> bool:
    """One step (sample, reference, gradients, optimizer step, ack, publish, log, checkpoint); False once stopped
    while waiting for a batch."""
    settings = state.settings
    t0 = time.monotonic()
    got = broadcast_batch(services.sample(state, stop), state.world)
    if got is None:
        return False
    items, leases = got
    shard = shard_items(items, state.rank, state.world, by_group=settings.loss.needs_groups)
    t_sampled = time.monotonic()
    ref_model, writer = state.ref_model, services.writer(state.table)
    n_ref = fill_reference(ref_model, writer, shard, settings) if ref_model is not None else 0
    t_ref = time.monotonic()
    acc = accumulate_gradients(state.engine, shard, settings, state.world)
    pre_clip_norm = grad_norm(state.engine.module)  # ZeRO-0/1: DeepSpeed does not report it for fp32
    if not all_ranks_agree(acc.losses_finite and (pre_clip_norm is None or math.isfinite(pre_clip_norm)), state.world):
        skip_non_finite(state, services, leases, acc)
        return True
    state.engine.step()
    report = step_report(state, items, acc, pre_clip_norm, n_ref, (t0, t_sampled, t_ref, time.monotonic()))
    advance(state, services, items, leases)
    services.replay_feedback(state, report.trained, report.replay)
    publish_step(state, services, report)
    services.record(state, report)
    if report.response is not None and report.response != "warn":
        carry_out(state, services, report.response)
        services.catch_up(refresh=True)
    if settings.checkpoint_interval_steps and state.step % settings.checkpoint_interval_steps == 0:
        checkpoint(state, services)
    return True


def skip_non_finite(state: LearnerState, services: RankServices, leases: list[str], acc: Accumulated) -> None:
    """A non-finite loss or gradient: no update, nothing published (learner/guard.py); the guard may respond."""
    response = skip_step(
        state.engine, state.guard, services.table, leases,
        acc.residuals.gathered(state.world), state.step + 1,
    )
    if response is not None and response != "warn":
        carry_out(state, services, response)


def step_report(
    state: LearnerState, items: list[Any], acc: Accumulated, pre_clip_norm: float | None, n_ref: int,
    times: tuple[float, float, float, float],
) -> StepReport:
    """The stepped batch's metrics over all ranks, and the guard's verdict on them."""
    world = state.world
    norm = state.engine.get_global_grad_norm()
    loss_metrics = reduce_metrics(acc.partials, world)
    n_tokens = int(all_reduce_sum([float(acc.n_tokens)], world)[0])
    n_ref, n_padding = (int(x) for x in all_reduce_sum([float(n_ref), float(acc.n_padding)], world))
    trained = acc.residuals.gathered(world)
    replay = {**residual_metrics(items, trained), **age_metrics(items)}
    response = state.guard.observe({**loss_metrics, **replay}, state.step + 1)
    t0, t_sampled, t_ref, t_step = times
    return StepReport(
        items=items, trained=trained, loss_metrics=loss_metrics, replay=replay, response=response,
        grad_norm=pre_clip_norm if norm is None else float(norm), n_ref=n_ref, n_micro=acc.n_micro,
        n_padding=n_padding, n_tokens=n_tokens, t0=t0, t_sampled=t_sampled, t_ref=t_ref, t_step=t_step,
    )


def advance(state: LearnerState, services: RankServices, items: list[Any], leases: list[str]) -> None:
    """The step counts: step and version advance; the batch is acked (consumed) once a checkpoint holds it."""
    state.step += 1
    state.version = next_version(state.version, services.version_floor())
    services.books_step(state, items, leases)
    services.ack(leases, len(items))


def publish_step(state: LearnerState, services: RankServices, report: StepReport) -> None:
    """Every K steps: check the weights (on every rank, so that all roll back together) and export them; then
    catch up the actors that lag the newest export."""
    if state.step % state.push_every == 0:
        if not params_finite(state.engine.module):
            log.error("weights are not finite after step %d: not published", state.step)
            state.guard.first_strike_step = state.step + 1  # this step broke them: step - 1 is the newest good one
            report.response = "rollback"
        elif report.response != "rollback":
            report.export_blocking_s = services.export(state.version)
    services.catch_up()


def carry_out(state: LearnerState, services: RankServices, response: str) -> None:
    """The guard's response (lr back-off or rollback, learner/guard.py `respond`) on every rank."""
    state.version = respond(
        response, state.engine, state.ckpt_dir, services.ack_held,
        state.settings.guard.lr_backoff_factor, state.version, services.publish, state.guard.safe_step,
    )


def checkpoint(state: LearnerState, services: RankServices) -> None:
    """A resumable checkpoint of this step (every rank), then rank 0 acks the leases it holds."""
    settings = state.settings
    save_checkpoint(state.engine, state.ckpt_dir, state.step, state.version, state.rank, settings.keep_checkpoints)
    state.last_ckpt_step = state.step
    services.checkpointed(state.step, state.version)


def shutdown(state: LearnerState, services: RankServices) -> None:
    """Exit: a checkpoint of the last step (unless it has one), then the final weights published and delivered."""
    if state.step > state.last_ckpt_step:
        checkpoint(state, services)
    services.finish(state)
    log.info("learner stopped at step %d, policy_version %d", state.step, state.version)
