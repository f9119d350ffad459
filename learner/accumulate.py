"""The gradient of one batch: this rank's shard in padded micro-batches, each back-propagated with its share of the
whole batch, and the step's loss metrics recombined over micro-batches and ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from buffer.schema import SampledItem
from learner.collectives import all_reduce_max, all_reduce_sum, collective_device
from learner.loss import TRAJ_PREFIX, LossBatch, compute_loss
from learner.loss_config import GrpoLossConfig, SftLossConfig
from learner.metrics import LOSS_DUPLICATES
from learner.model import MicroBatch, collate, plan_micro_batches, response_logits
from learner.replay import ResidualLog
from learner.settings import LearnerSettings


@dataclass
class Accumulated:
    """What `accumulate_gradients` leaves besides the gradients (this rank's part; `reduce` combines the ranks)."""

    partials: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    """(weight, loss metrics) per real micro-batch; the weights sum to 1 over all ranks."""
    residuals: ResidualLog = field(default_factory=ResidualLog)
    n_tokens: int = 0
    losses_finite: bool = True
    n_micro: int = 0
    """Backwards run: the largest number of micro-batches of any rank."""
    n_padding: int = 0
    """Zero-weight backwards this rank ran to match that number."""


def token_mean_loss(settings: LearnerSettings) -> bool:
    """Whether the loss averages over response tokens (else over trajectories, like TBRM)."""
    loss = settings.loss
    return isinstance(loss, SftLossConfig) or (isinstance(loss, GrpoLossConfig) and loss.aggregation == "token_mean")


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
    if settings.loss.needs_groups:
        ids: dict[str, int] = {}
        group_ids = torch.tensor(
            [ids.setdefault(t.group_id, len(ids)) for t in trajs], dtype=torch.long, device=mb.tokens.device
        )
    return LossBatch(
        tokens=mb.tokens, mask=mb.mask, rewards=mb.rewards, ref_logprobs=ref, ref_v0=ref_v0,
        behaviour_logprobs=mb.behaviour_logprobs, group_ids=group_ids,
    )


def accumulate_gradients(engine: Any, shard: list[SampledItem], settings: LearnerSettings, world: int) -> Accumulated:
    """Back-propagate this rank's shard so that the accumulated gradient is the gradient of the loss over the whole
    batch (all ranks), whatever the micro-batch split or the number of ranks.

    Invariant: micro-batch i is back-propagated with weight w_i = u_i / U, where u_i are its units (trajectories
    for TBRM and sequence-mean losses, response tokens for token-mean losses, `token_mean_loss`) and U the units
    of the whole batch summed over the ranks, so sum_i w_i = 1 over all ranks and micro-batches. The loss of a
    micro-batch is a mean over its own units, hence sum_i w_i * loss_i is the loss of the whole batch. DeepSpeed
    averages gradients over the ranks, so each backward is scaled by `world` to make that average the sum.

    ZeRO-2 reduces gradients inside every backward: all ranks must run as many. A rank with fewer micro-batches
    repeats its first one with weight 0 (`n_padding`). The metrics of a micro-batch are weighted by its share of
    the batch's trajectories (`partials`), the loss by its own weight w_i."""
    trajs = [it.trajectory for it in shard]
    plans = plan_micro_batches(
        trajs, settings.micro_batch_size, settings.max_tokens_per_micro_batch,
        group_aligned=settings.loss.needs_groups,
    )
    by_tokens = token_mean_loss(settings)
    local_units = sum(len(t.response_token_ids) for t in trajs) if by_tokens else len(trajs)
    total_units, total_trajs = all_reduce_sum([float(local_units), float(len(trajs))], world)
    out = Accumulated(n_micro=int(all_reduce_max(float(len(plans)), world)))
    out.n_padding = out.n_micro - len(plans)
    for j in range(out.n_micro):
        plan = plans[j] if j < len(plans) else plans[0]
        mb = collate([trajs[i] for i in plan], rows=plan).to(engine.device)
        logits = response_logits(engine, mb, settings.autocast)
        loss, m = compute_loss(settings.loss, logits, loss_batch(mb, shard, settings))
        if j >= len(plans):
            engine.backward(loss * 0.0, scale_wrt_gas=False)
            continue
        out.n_tokens += mb.n_tokens
        out.losses_finite = out.losses_finite and bool(torch.isfinite(loss.detach()))
        out.residuals.add(shard, plan, m)
        units = float(mb.mask.sum()) if by_tokens else len(plan)
        weight = units / max(total_units, 1.0)
        engine.backward(loss * (weight * world), scale_wrt_gas=False)
        metric_w = len(plan) / total_trajs
        mf = {k: float(v) for k, v in m.items() if not k.startswith(TRAJ_PREFIX) and k not in LOSS_DUPLICATES}
        mf["loss"] = mf["loss"] * weight / metric_w  # loss combines with its own weight
        out.partials.append((metric_w, mf))
    return out


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
