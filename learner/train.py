"""The learner loop: sample from the replay buffer -> reference log-probs -> loss -> step -> ack -> push weights.

Readable top to bottom: `train(settings)` does setup, then the loop, logging and checkpointing.

    python -m learner                       # the service: this loop + the status HTTP server (port 8003)
    torchrun --nproc_per_node 2 -m learner  # data-parallel (gloo on CPU); only rank 0 serves HTTP

Per step (docs/architecture-and-dataflow.md):
 1. rank 0 samples `batch_size` trajectories with a lease (`ReplayTable.sample`); with several ranks it broadcasts
    the batch and rank r trains on items r, r+W, r+2W, ... (one lease, one ack, no duplicates).
 2. items without cached reference log-probs get them from the frozen reference model; they are written back
    (`cache_reference`) so replays of the same item skip the reference forward.
 3. the shard is cut into padded micro-batches; each micro-batch loss is weighted by its share of the global batch
    (trajectories for TBRM, response tokens for token-mean losses), so the accumulated gradient is exactly the
    gradient of the loss over the whole batch, whatever the micro-batch split or the number of ranks.
 4. DeepSpeed clips the global grad norm and steps; policy_version += 1. Rank 0 acks the batch's lease once a
    checkpoint holds the update (learner/acks.py: the lease is renewed until then, so a crash returns the batch
    to the buffer instead of losing it); without periodic checkpoints it acks right away.
 5. every K steps rank 0 exports safetensors, records them in `WeightsStore` and pushes them to every live actor
    (non-blocking, see learner/push.py); lagging or late actors are caught up after every step.
 6. rank 0 appends one JSON line to `<run_dir>/metrics.jsonl` and updates `LearnerStatusStore`.
 7. every N steps and at exit: a checkpoint (model, optimizer, scheduler, step/version, RNG of every rank) that
    `resume` restores exactly; then rank 0 acks the leases of the steps it covers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis as redis_lib
import torch

from buffer.client import (
    ActorRegistry,
    LearnerStatusStore,
    RateLimitTimeout,
    ReplayTable,
    WeightsStore,
    connect,
)
from buffer.schema import LearnerStatus, PrioritizedSampler, SampledItem, WeightsInfo
from common.files import tbrm_home as default_cache_dir
from learner.acks import PendingAcks, ack_lease, patient_redis, renew_held
from learner.checkpoints import (
    TRAINING_LOG,
    StalenessRecovery,
    TrainingLog,
    latest_checkpoint,
    live_actor_versions,
    next_version,
    read_training_log,
    repair_version,
    rolled_back_items,
    save_checkpoint,
    set_rng_state,
)
from learner.collectives import collective_device, default_accelerator
from learner.export import WeightExporter
from learner.guard import StabilityGuard, all_ranks_agree, grad_norm, params_finite, scale_lr
from learner.live import LiveStatus
from learner.loss import TRAJ_PREFIX, LossBatch, compute_loss
from learner.loss_config import GrpoLossConfig, SftLossConfig
from learner.model import (
    MicroBatch,
    collate,
    load_causal_lm,
    plan_micro_batches,
    reference_logprobs,
    response_logits,
)
from learner.push import PushFn, WeightPusher
from learner.replay import ResidualLog, age_metrics, residual_metrics, reuse_metrics, write_priorities
from learner.settings import ConstantSchedule, LearnerSettings
from learner.tracking import open_metrics_log

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
BUFFER_STATS_EVERY_STEPS = 10  # reuse / never-trained figures: one stats call per 10 steps, not per step
CHECKPOINT_DIR = "checkpoints"
WEIGHTS_DIR = "weights"


@dataclass
class TrainResult:
    step: int
    policy_version: int
    history: list[dict[str, Any]]
    """The metrics lines written by this call (rank 0; empty on other ranks)."""
    model: torch.nn.Module | None = None
    """The trained policy module (for tests and tools; the service exits instead)."""


# ------------------------------------------------------------------------------------------------------------------
# Setup helpers
# ------------------------------------------------------------------------------------------------------------------


def ensure_single_process_env() -> None:
    """DeepSpeed needs the torch.distributed variables even for one process (else it looks for MPI)."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free))


def configure_environment() -> None:
    """DeepSpeed's accelerator follows the hardware (cuda with a GPU, else cpu) unless DS_ACCELERATOR is set, and a
    persistent cache for its compiled ops (the first build takes ~25 s)."""
    os.environ.setdefault("DS_ACCELERATOR", default_accelerator())
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_cache_dir() / "torch_extensions"))
    ensure_single_process_env()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(settings: LearnerSettings):  # noqa: ANN201  (a closure for LambdaLR)
    """Multiplier of the peak lr at optimizer step `s` (warm-up, then constant or cosine)."""
    sched = settings.schedule

    def f(s: int) -> float:
        if sched.warmup_steps and s < sched.warmup_steps:
            return (s + 1) / sched.warmup_steps
        if isinstance(sched, ConstantSchedule):
            return 1.0
        decay = sched.decay_steps or max(1, (settings.max_steps or 1) - sched.warmup_steps)
        progress = min(1.0, (s - sched.warmup_steps) / decay)
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(settings: LearnerSettings, world_size: int) -> dict[str, Any]:
    """The user's JSON (if any) with the batch and clipping keys this loop owns filled in.

    The loop does its own gradient accumulation over a variable number of micro-batches, so DeepSpeed runs with
    `managed_gradient_accumulation: false`: `backward` only accumulates, `step` reduces across ranks and updates.
    """
    cfg: dict[str, Any] = {}
    if settings.ds_config_path:
        cfg = json.loads(Path(settings.ds_config_path).read_text())
    else:
        cfg["zero_optimization"] = {"stage": settings.zero_stage}
    cfg["train_micro_batch_size_per_gpu"] = settings.micro_batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = settings.micro_batch_size * world_size
    cfg["managed_gradient_accumulation"] = False
    cfg["zero_allow_untested_optimizer"] = True  # a client torch AdamW: no optimizer op to compile
    if settings.grad_clip is not None:
        cfg["gradient_clipping"] = settings.grad_clip
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


# ------------------------------------------------------------------------------------------------------------------
# Per-step pieces
# ------------------------------------------------------------------------------------------------------------------


def sample_batch(
    table: ReplayTable, settings: LearnerSettings, version: int, stop: threading.Event,
    on_wait: Callable[[], Any] = lambda: None,
) -> tuple[list[SampledItem], list[str]] | None:
    """Sample `batch_size` items (with leases); None if stopped while waiting.

    Sync mode keeps only trajectories generated by the current weights (`policy_version == version`): others are
    acked away (consumed) and the learner samples again until the batch is full, renewing the leases of the items
    it keeps meanwhile. A Redis error (restart) is logged and the sample retried: the learner waits as for data.
    """
    items: list[SampledItem] = []
    leases: list[str] = []
    while len(items) < settings.batch_size:
        if stop.is_set():
            if leases:
                # nothing trained on them: let the leases expire so the items come back
                log.info("stopping with %d sampled items unacked (leases expire)", len(items))
            return None
        renew_held(table, leases, settings.lease_s)
        try:
            got = table.sample(
                settings.batch_size - len(items), version, timeout_s=settings.sample_timeout_s,
                lease_s=settings.lease_s,
            )
        except RateLimitTimeout:
            log.info("no batch within %.0fs (waiting for actors)", settings.sample_timeout_s)
            on_wait()  # e.g. catch up actors that joined while the learner waits for data
            continue
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as e:
            log.warning("sampling failed (%s): retrying in 1 s", e)
            stop.wait(1.0)
            continue
        if not settings.sync:
            return got.items, [got.lease_id]
        keep = [it for it in got.items if it.trajectory.policy_version == version]
        drop = [it.info.item_id for it in got.items if it.trajectory.policy_version != version]
        if drop:
            ack_lease(table, got.lease_id, drop)
        if keep:
            items += keep
            leases.append(got.lease_id)
        elif not drop:
            continue
    return items, leases


def fill_reference(
    ref_model: torch.nn.Module, table: ReplayTable | None, items: list[SampledItem], settings: LearnerSettings
) -> int:
    """Compute and cache the reference log-probs (and V_ref(s_1)) of items that lack them; returns how many."""
    need_v0 = settings.loss.needs_ref_v0
    todo = [
        i for i, it in enumerate(items)
        if it.trajectory.ref_logprobs is None or (need_v0 and it.trajectory.ref_v0 is None)
    ]
    trajs = [items[i].trajectory for i in todo]
    device = next(ref_model.parameters()).device
    cache: dict[str, tuple[list[float], float]] = {}
    for plan in plan_micro_batches(trajs, settings.micro_batch_size, settings.max_tokens_per_micro_batch):
        mb = collate([trajs[j] for j in plan]).to(device)
        logp, v0 = reference_logprobs(ref_model, mb, settings.autocast)
        for row, j in enumerate(plan):
            t = trajs[j]
            n = len(t.response_token_ids)
            t.ref_logprobs = logp[row, :n].tolist()
            t.ref_v0 = float(v0[row])
            cache[items[todo[j]].info.item_id] = (t.ref_logprobs, t.ref_v0)
    if table is not None and cache:
        table.cache_references(cache)  # one call; skipped for items whose coming ack removes them
    return len(todo)


def loss_batch(mb: MicroBatch, items: list[SampledItem], settings: LearnerSettings) -> LossBatch:
    """The loss inputs of one micro-batch (reference log-probs from the trajectories, padded like the tokens)."""
    trajs = [items[i].trajectory for i in mb.rows]
    ref = ref_v0 = group_ids = None
    if settings.loss.needs_ref_logprobs:
        ref = torch.zeros(mb.tokens.shape, dtype=torch.float32)
        for r, t in enumerate(trajs):
            ref[r, : len(t.response_token_ids)] = torch.tensor(t.ref_logprobs or [], dtype=torch.float32)
        ref = ref.to(mb.tokens.device)
    if settings.loss.needs_ref_v0:
        ref_v0 = torch.tensor([t.ref_v0 for t in trajs], dtype=torch.float32, device=mb.tokens.device)
    if isinstance(settings.loss, GrpoLossConfig):
        ids: dict[str, int] = {}
        group_ids = torch.tensor(
            [ids.setdefault(t.group_id, len(ids)) for t in trajs], dtype=torch.long, device=mb.tokens.device
        )
    return LossBatch(
        tokens=mb.tokens, mask=mb.mask, rewards=mb.rewards, ref_logprobs=ref, ref_v0=ref_v0,
        behaviour_logprobs=mb.behaviour_logprobs, group_ids=group_ids,
    )


def token_mean_loss(settings: LearnerSettings) -> bool:
    """Whether the loss averages over response tokens (else over trajectories, like TBRM)."""
    loss = settings.loss
    return isinstance(loss, SftLossConfig) or (isinstance(loss, GrpoLossConfig) and loss.aggregation == "token_mean")


def all_reduce_sum(values: list[float], world_size: int) -> list[float]:
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t[0])


def shard_items(items: list[SampledItem], rank: int, world: int, by_group: bool = False) -> list[SampledItem]:
    """This rank's part of the batch: items rank, rank+W, ...; with `by_group` (GRPO) whole groups go to one
    rank (each group to the rank holding the fewest items so far), so group normalization sees whole groups."""
    if world == 1:
        return items
    groups: dict[str, list[SampledItem]] = {}
    for it in items:
        groups.setdefault(it.trajectory.group_id, []).append(it)
    if not by_group or len(groups) < world:
        return items[rank::world]
    shards: list[list[SampledItem]] = [[] for _ in range(world)]
    for members in groups.values():
        min(shards, key=len).extend(members)
    return shards[rank]


def reduce_metrics(partials: list[tuple[float, dict[str, float]]], world_size: int) -> dict[str, float]:
    """Combine per-micro-batch metrics with weights that sum to 1 over all ranks: means are weighted, `*_max`
    keys take the max, and `residual_std` is recombined exactly from the per-part means and second moments."""
    keys = sorted({k for _, m in partials for k in m})
    sums = dict.fromkeys(keys, 0.0)
    maxes = dict.fromkeys(keys, -math.inf)
    sq = 0.0
    for w, m in partials:
        for k, v in m.items():
            sums[k] += w * v
            maxes[k] = max(maxes[k], v)
        if "residual_std" in m:
            sq += w * (m["residual_std"] ** 2 + m["residual_mean"] ** 2)
    vec = all_reduce_sum([sums[k] for k in keys] + [sq], world_size)
    if world_size > 1:
        mx = torch.tensor([maxes[k] for k in keys], dtype=torch.float64, device=collective_device())
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
        maxes = dict(zip(keys, mx.tolist(), strict=True))
    out = {k: (maxes[k] if k.endswith("_max") else vec[i]) for i, k in enumerate(keys)}
    if "residual_std" in out:
        out["residual_std"] = math.sqrt(max(0.0, vec[-1] - out["residual_mean"] ** 2))
    return out


def batch_metrics(items: list[SampledItem]) -> dict[str, float]:
    """Data metrics of the whole batch (rank 0): reward, grade-status fractions, version lag, replays."""
    n = len(items)
    status = Counter(it.trajectory.grade_status for it in items)
    lag = [it.info.age_versions for it in items]
    out = {
        "batch_size": float(n),
        "batch_reward_mean": sum(it.trajectory.reward for it in items) / n,
        "version_lag_mean": sum(lag) / n,
        "version_lag_max": float(max(lag)),
        "times_sampled_mean": sum(it.info.times_sampled for it in items) / n,
        "buffer_size": float(items[-1].info.buffer_size),
    }
    for s in ("correct", "incorrect", "no_answer", "timeout", "error"):
        out[f"frac_{s}"] = status.get(s, 0) / n
    return out


def _forget_stale_deepspeed_world_group() -> None:
    """Drop DeepSpeed's cached clone of the world group if its process group no longer exists.

    DeepSpeed caches that clone at module level. When another library in the same process tears the default process
    group down and builds a new one (vLLM's in-process engine does, e.g. `tbrm eval` or tests that run both), the
    cached group is unregistered and `deepspeed.initialize` fails with "Group ... is not registered"."""
    from deepspeed.utils import groups  # noqa: PLC0415

    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is not None and cached not in torch.distributed.distributed_c10d._world.pg_group_ranks:
        groups._WORLD_GROUP = None


def ack_checkpointed(pending: PendingAcks | None) -> None:
    """After a checkpoint: ack the leases of every step it holds (rank 0; no-op without deferred acks)."""
    if pending is None:
        return
    acked, held = pending.ack_all()
    if acked < held:
        # an expired lease (see PendingAcks.renew) or items evicted by max_size while leased
        log.warning("acked %d of %d checkpointed items; the rest expired or were evicted", acked, held)


def skip_step(
    engine: Any, guard: StabilityGuard, table: ReplayTable | None, leases: list[str],
    values: dict[str, tuple[float, float, float]], step: int,
) -> str | None:
    """Discard a non-finite step's gradients; returns the guard's response if this was one strike too many.

    Items whose own residual is not finite are poison (e.g. an absurd reward) and are acked away so they cannot
    stall the learner; the others' leases expire and they come back."""
    engine.zero_grad()
    guard.skipped_steps += 1
    poison = [item_id for item_id, (delta, _, _) in values.items() if not math.isfinite(delta)]
    if table is not None and poison:
        for lease in leases:
            table.ack(lease, poison)
    return guard.strike(step, f"non-finite loss or gradient, step skipped ({len(poison)} poison items acked)")


def checkpoint_at_or_before(ckpt_dir: Path, step: int) -> str | None:
    """Tag of the newest complete checkpoint of a step <= `step` (tags are `step-<8 digits>`)."""
    tags = sorted(
        (int(p.name.removeprefix("step-")), p.name) for p in ckpt_dir.glob("step-*")
        if p.is_dir() and p.name.removeprefix("step-").isdigit()
    )
    ok = [tag for s, tag in tags if s <= step]
    return ok[-1] if ok else None


def respond(
    response: str, engine: Any, ckpt_dir: Path, pending: PendingAcks | None, settings: LearnerSettings,
    version: int, publish: Callable[[int], WeightsInfo], rank: int, safe_step: int,
) -> int:
    """Carry out the guard's response; returns the policy version to continue from.

    rollback: restore the newest checkpoint of a step <= `safe_step` (model, optimizer, scheduler) on every rank,
    then back off the lr. The batches held since the last checkpoint are acked (their updates are discarded with
    the diverged weights rather than retrained), and the restored weights are published as a NEW version (versions
    never repeat or go back). Without such a checkpoint, a rollback is an lr back-off only."""
    tag = checkpoint_at_or_before(ckpt_dir, safe_step) if response == "rollback" else None
    if tag is None and not params_finite(engine.module):
        raise RuntimeError("the weights are not finite and there is no checkpoint to roll back to")
    if tag is not None:
        base = list(engine.lr_scheduler.base_lrs)
        engine.load_checkpoint(str(ckpt_dir), tag=tag)
        engine.lr_scheduler.base_lrs = base  # keep earlier back-offs; the checkpoint's base predates them
        ack_checkpointed(pending)
    lr = scale_lr(engine, settings.guard.lr_backoff_factor)
    log.warning("stability guard: %s (checkpoint %s), lr now %.3g", response, tag or "none", lr)
    if tag is None:
        return version
    version += 1
    if rank == 0:
        publish(version)
    return version


# ------------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------------


def train(
    settings: LearnerSettings,
    stop: threading.Event | None = None,
    live: LiveStatus | None = None,
    push_fn: PushFn | None = None,
) -> TrainResult:
    """Run the learner until `max_steps` or `stop` is set; returns the final step/version and metrics history."""
    stop = stop or threading.Event()
    live = live or LiveStatus()

    # ---------------------------------------------------------------- setup
    configure_environment()
    import deepspeed  # noqa: PLC0415  (heavy; after the environment is set)

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    _forget_stale_deepspeed_world_group()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if settings.batch_size % world:
        raise ValueError(f"batch_size={settings.batch_size} must be divisible by the {world} data-parallel ranks")
    seed_everything(settings.seed)
    run_dir = Path(settings.run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    for path in (settings.model_path, settings.ref_model_path):
        if path is not None and not (Path(path) / "config.json").exists():
            raise FileNotFoundError(
                f"no HF model at {path} (config.json missing); build the toy model with `tbrm toy-model` "
                "or set model_path"
            )
    policy = load_causal_lm(settings.model_path, settings.dtype, trainable=True)
    if settings.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if settings.loss.needs_ref_logprobs:
        ref_model = load_causal_lm(settings.ref_model_path or settings.model_path, settings.dtype, trainable=False)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=settings.lr, betas=settings.adam_betas, eps=settings.adam_eps,
        weight_decay=settings.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    engine, _, _, _ = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(settings, world)
    )
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 partitions the parameters: engine.module.state_dict() is not the HF state dict to push
        raise ValueError("ZeRO stage 3 is not supported (weight export needs full parameters); use stage <= 2")
    if ref_model is not None:
        ref_model.to(engine.device)

    step = version = 0
    tag = None if settings.resume == "never" else latest_checkpoint(ckpt_dir)
    if settings.resume == "must" and tag is None:
        raise FileNotFoundError(f"resume='must' but no checkpoint in {ckpt_dir}")
    if tag is not None:
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        step, version = int(client_state["step"]), int(client_state["policy_version"])
        rng_file = ckpt_dir / tag / f"rng-rank{rank}.json"
        if rng_file.exists():
            set_rng_state(json.loads(rng_file.read_text()))
        log.info("resumed from %s: step %d, policy_version %d", tag, step, version)
    last_ckpt_step = step

    # Every rank talks to Redis (each caches the reference log-probs of its own shard); rank 0 owns the rest.
    redis = patient_redis(connect(settings.redis_url))
    table = ReplayTable(redis, settings.table)
    # Never reuse a version number for other weights, whatever this start resumed from (learner/checkpoints.py).
    version = repair_version(version, WeightsStore(redis).latest(), live_actor_versions(ActorRegistry(redis)), world)
    recovery = StalenessRecovery(
        table, rolled_back_items(read_training_log(run_dir / TRAINING_LOG), step) if rank == 0 else {},
        None if settings.sync else table.config.max_staleness_versions,
    )
    books = TrainingLog(run_dir) if rank == 0 else None
    weights_store = status_store = pusher = pending = exporter = None
    metrics_file = None
    latest: WeightsInfo | None = None

    def publish(v: int) -> WeightsInfo | None:
        """Export the current weights as version `v`, record them in Redis and push them; waits (rank 0)."""
        return exporter.publish_now(v)

    if rank == 0:
        weights_store = WeightsStore(redis)
        status_store = LearnerStatusStore(redis)
        registry = ActorRegistry(redis)
        pusher = WeightPusher(
            registry.live, settings.auth_token, timeout_s=settings.push_timeout_s, retry_s=settings.push_retry_s,
            workers=settings.push_workers, push_fn=push_fn, canary_max_drift=settings.canary_max_drift,
        )
        # snapshot on this thread, export + push on the exporter's while the next step runs (learner/export.py)
        exporter = WeightExporter(engine.module, run_dir / WEIGHTS_DIR, keep=settings.keep_weights,
                                  dtype=settings.export_dtype, publish=weights_store.set_latest, pusher=pusher)
        metrics_file = open_metrics_log(run_dir, settings, METRICS_FILE)  # + TensorBoard/W&B/MLflow; closed in finally
        if settings.ack_after_checkpoint and settings.checkpoint_interval_steps and table.config.max_times_sampled == 1:
            pending = PendingAcks(table, settings.lease_s or table.config.lease_s)
            held = settings.checkpoint_interval_steps * settings.batch_size
            if held > table.config.max_size // 2:
                log.warning(
                    "up to %d trajectories stay leased until the next checkpoint (checkpoint_interval_steps x "
                    "batch_size), more than half the table's max_size=%d: lower checkpoint_interval_steps",
                    held, table.config.max_size,
                )
        if version > 0:
            # a resumed learner is ahead of freshly started actors: publish its weights for catch-up
            latest = publish(version)
        pusher.sync(latest)
        books.start(step, version, tag)
        live.update(state="running", step=step, policy_version=version, latest_weights=latest)
        status_store.set(LearnerStatus(step=step, policy_version=version, state="running"))
    push_every = 1 if settings.sync else settings.push_interval_steps
    guard = StabilityGuard(settings.guard)
    write_prio = (settings.priorities.enabled and isinstance(table.config.sampler, PrioritizedSampler)
                  and not isinstance(settings.loss, GrpoLossConfig | SftLossConfig))
    history: list[dict[str, Any]] = []
    log.info("learner rank %d/%d ready at step %d (loss %s)", rank, world, step, settings.loss.kind)

    # ---------------------------------------------------------------- loop
    try:
        while settings.max_steps is None or step < settings.max_steps:
            t0 = time.monotonic()
            # 1. sample (rank 0) and share the batch with the other ranks
            got = None
            if rank == 0:
                got = sample_batch(table, settings, recovery.sampling_version(version), stop,
                                   on_wait=lambda w=latest: pusher.sync(w))
            if world > 1:
                box = [got]
                torch.distributed.broadcast_object_list(box, src=0)
                got = box[0]
            if got is None:
                break
            items, leases = got
            shard = shard_items(items, rank, world, by_group=isinstance(settings.loss, GrpoLossConfig))
            t_sampled = time.monotonic()

            # 2. reference log-probs for the items that lack them (written back to the buffer)
            n_ref = fill_reference(ref_model, table, shard, settings) if ref_model is not None else 0
            t_ref = time.monotonic()

            # 3. weighted micro-batches: the gradient of the whole batch's loss
            trajs = [it.trajectory for it in shard]
            plans = plan_micro_batches(
                trajs, settings.micro_batch_size, settings.max_tokens_per_micro_batch,
                group_aligned=isinstance(settings.loss, GrpoLossConfig),
            )
            by_tokens = token_mean_loss(settings)
            local_units = sum(len(t.response_token_ids) for t in trajs) if by_tokens else len(trajs)
            total_units, total_trajs = all_reduce_sum([float(local_units), float(len(trajs))], world)
            # ZeRO-2 reduces gradients inside every backward: all ranks must run as many. A rank with fewer
            # micro-batches repeats its first one with weight 0.
            n_micro = int(all_reduce_max(float(len(plans)), world))
            partials: list[tuple[float, dict[str, float]]] = []
            n_tokens = 0
            residuals = ResidualLog()
            losses_finite = True
            for j in range(n_micro):
                plan = plans[j] if j < len(plans) else plans[0]
                mb = collate([trajs[i] for i in plan], rows=plan).to(engine.device)
                logits = response_logits(engine, mb, settings.autocast)
                loss, m = compute_loss(settings.loss, logits, loss_batch(mb, shard, settings))
                if j >= len(plans):
                    engine.backward(loss * 0.0, scale_wrt_gas=False)
                    continue
                n_tokens += mb.n_tokens
                losses_finite = losses_finite and bool(torch.isfinite(loss.detach()))
                residuals.add(shard, plan, m)
                units = float(mb.mask.sum()) if by_tokens else len(plan)
                # DeepSpeed averages gradients over ranks, hence the factor `world`.
                weight = units / max(total_units, 1.0)
                engine.backward(loss * (weight * world), scale_wrt_gas=False)
                metric_w = len(plan) / total_trajs
                mf = {k: float(v) for k, v in m.items() if not k.startswith(TRAJ_PREFIX)}
                mf["loss"] = mf["loss"] * weight / metric_w  # loss combines with its own weight
                partials.append((metric_w, mf))
            pre_clip_norm = grad_norm(engine.module)  # ZeRO-0/1: DeepSpeed does not report it for fp32
            if not all_ranks_agree(losses_finite and (pre_clip_norm is None or math.isfinite(pre_clip_norm)), world):
                # 3b. a non-finite loss or gradient: no update, nothing published (learner/guard.py)
                response = skip_step(
                    engine, guard, table if rank == 0 else None, leases, residuals.gathered(world), step + 1
                )
                if response is not None and response != "warn":
                    version = respond(response, engine, ckpt_dir, pending, settings, version, publish, rank,
                                      guard.safe_step)
                continue
            engine.step()
            t_step = time.monotonic()
            norm = engine.get_global_grad_norm()
            norm = pre_clip_norm if norm is None else float(norm)
            loss_metrics = reduce_metrics(partials, world)
            n_tokens = int(all_reduce_sum([float(n_tokens)], world)[0])
            n_ref, n_padding = (int(x) for x in all_reduce_sum([float(n_ref), float(n_micro - len(plans))], world))
            trained = residuals.gathered(world)
            replay = {**residual_metrics(items, trained), **age_metrics(items)}
            response = guard.observe({**loss_metrics, **replay}, step + 1)

            # 4. advance the version; the batch is acked (consumed) once a checkpoint holds this update
            step += 1
            version = next_version(version, pusher.version_floor if pusher is not None else 0)
            if books is not None:
                books.step(step, version, items, leases)
                recovery.seen(items)
            if pending is not None:
                pending.add(leases, len(items))
            elif rank == 0:
                acked = sum(ack_lease(table, lease) for lease in leases)
                if acked < len(items):
                    # the lease expired during the step: those items went back and may be trained on again
                    log.warning("only %d of %d items acked: raise lease_s above the step time", acked, len(items))

            # 5. priorities back to the buffer; export + push every K steps; catch up lagging actors every step
            if rank == 0 and write_prio:
                write_priorities(table, trained, settings.priorities.eps)
            if rank == 0 and step % BUFFER_STATS_EVERY_STEPS == 0:
                replay.update(reuse_metrics(table.stats()))
            if step % push_every == 0 and not params_finite(engine.module):
                log.error("weights are not finite after step %d: not published", step)
                guard.first_strike_step = step + 1  # this step broke them: step - 1 is the newest good checkpoint
                response = "rollback"
            t_push = 0.0
            if rank == 0 and step % push_every == 0 and response != "rollback":
                tp = time.monotonic()
                exporter.submit(version)
                t_push = time.monotonic() - tp
            if rank == 0:
                latest = exporter.latest or latest
                pusher.sync(latest)

            # 6. log
            if rank == 0:
                dt = time.monotonic() - t0
                line: dict[str, Any] = {
                    "step": step,
                    "policy_version": version,
                    "time": time.time(),
                    **loss_metrics,
                    **batch_metrics(items),
                    **replay,
                    **guard.metrics(),
                    "guard_response": response,
                    "grad_norm": norm,
                    "grad_clipped": float(norm is not None and settings.grad_clip is not None
                                          and norm > settings.grad_clip),
                    "lr": float(engine.get_lr()[0]),
                    "ref_computed": n_ref,
                    "micro_batches": n_micro,
                    "padding_backwards": n_padding,
                    "tokens": n_tokens,
                    "tokens_per_s": n_tokens / max(t_step - t_sampled, 1e-9),
                    "step_time_s": dt,
                    "sample_time_s": t_sampled - t0,
                    "ref_time_s": t_ref - t_sampled,
                    "train_time_s": t_step - t_ref,
                    "export_blocking_s": t_push,
                    **exporter.metrics(),
                    "canary_drift_max": pusher.stats.canary_drift_max,
                    "canary_alarms": pusher.stats.canary_alarms,
                    "push_latency_s": pusher.stats.last_latency_s,
                    "pushes_ok": pusher.stats.pushes_ok,
                    "pushes_failed": pusher.stats.pushes_failed,
                    "unacked_items": pending.pending_items if pending is not None else 0,
                }
                metrics_file.write(line)
                history.append(line)
                numeric = {k: float(v) for k, v in line.items() if isinstance(v, int | float) and v is not None}
                live.update(
                    step=step, policy_version=version, last_step_at=time.time(), metrics=numeric,
                    latest_weights=latest, actors_delivered=pusher.delivered(),
                    actors_canary_drift=pusher.canary_drift(),
                )
                status_store.set(LearnerStatus(step=step, policy_version=version, metrics=numeric, state="running"))
                log.info(
                    "step %d v%d loss %.4g residual %.3g v0 %.3g reward %.3f lag %.1f %.2fs",
                    step, version, line.get("loss", float("nan")), line.get("residual_mean", float("nan")),
                    line.get("v0_mean", float("nan")), line["batch_reward_mean"], line["version_lag_mean"], dt,
                )

            # 7. the guard's answer to a blow-up; checkpoint
            if response is not None and response != "warn":
                version = respond(response, engine, ckpt_dir, pending, settings, version, publish, rank,
                                  guard.safe_step)
                if rank == 0:
                    latest = weights_store.latest()
                    pusher.sync(latest)
            if settings.checkpoint_interval_steps and step % settings.checkpoint_interval_steps == 0:
                save_checkpoint(engine, ckpt_dir, step, version, rank, settings.keep_checkpoints)
                last_ckpt_step = step
                if books is not None:
                    books.checkpoint(step, version)
                ack_checkpointed(pending)
    except BaseException as e:
        live.update(state="failed", error=repr(e))
        if status_store is not None:
            try:
                status_store.set(LearnerStatus(step=step, policy_version=version, state="failed"))
            except Exception as e2:  # noqa: BLE001  (Redis may be the failure; the original error is raised)
                log.warning("cannot record the failure in Redis: %s", e2)
        if exporter is not None:
            exporter.close(timeout_s=settings.push_timeout_s)
        if pusher is not None:
            pusher.close()
        if pending is not None:
            pending.close()  # unacked leases expire: their batches return to the buffer for the resumed learner
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
    # ---------------------------------------------------------------- exit: checkpoint, final weights and push
    if step > last_ckpt_step:
        save_checkpoint(engine, ckpt_dir, step, version, rank, settings.keep_checkpoints)
        if books is not None:
            books.checkpoint(step, version)
    ack_checkpointed(pending)
    if pending is not None:
        pending.close()
    if rank == 0:
        if version > 0 and (latest is None or latest.version != version):
            latest = publish(version)
        # deliver the final weights; pushes in flight finish (each is bounded by its timeout)
        pusher.sync(latest)
        exporter.close(timeout_s=settings.push_timeout_s)
        pusher.wait_idle(settings.push_timeout_s)
        pusher.close()
        status_store.set(LearnerStatus(step=step, policy_version=version, metrics=live.metrics, state="stopped"))
        live.update(state="stopped", latest_weights=latest, actors_delivered=pusher.delivered())
    log.info("learner stopped at step %d, policy_version %d", step, version)
    return TrainResult(step=step, policy_version=version, history=history, model=engine.module)
