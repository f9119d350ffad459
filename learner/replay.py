"""Replay feedback: what one trained batch tells the buffer and the logs.

The loss computes, for every trajectory of a batch, its Bellman residual delta(tau) on the pre-step weights
(learner/loss.py, the `traj_*` outputs). This module turns them into

* **replay priorities** p_i = |delta_i| + eps, written back for the whole batch in one `update_priorities` call
  (with the next step's sample, in the same round trip).
  A `prioritized` table sampler draws P(i) ∝ p_i^alpha (alpha = `table.sampler.exponent`), and new items enter at
  the largest priority seen so far, so every trajectory is trained on at least once before the residuals decide.
* **diagnostics**: the residual and log pi(tau)/pi_ref(tau) split by reward class, the age of the trained data in
  versions and seconds, and an off-policy-valid estimate of KL(pi || pi_ref) (below).

Why TBRM needs no importance weights for prioritized (or any) replay: the objective is a mean of squared
trajectory residuals whose minimizer — every residual zero, i.e. pi = pi* ∝ pi_ref exp(r/beta) — does not depend on
which trajectories are drawn, as long as the sampling distribution covers them (the paper's Theorem 2; transitions
are deterministic, so no expectation over next states is biased by the sampling distribution, which is what the
importance weights of prioritized DQN correct for). Prioritizing changes the *weighting* of the residuals: which
ones are fitted first and, when the model cannot zero them all, the weighted least-squares compromise between them
(high-|delta| trajectories count more). It does not move the optimum.

The KL estimate: the trajectories come from behaviour policies mu (older weights, a sampling temperature), so the
plain mean of log pi/pi_ref estimates E_mu[...], not KL(pi || pi_ref) = E_pi[log pi/pi_ref]. `kl_snis` reweights
it with self-normalized importance weights w_i ∝ pi(tau_i)/mu(tau_i) (pi from this step's forward pass, mu from
the behaviour log-probs the actor stored): consistent for any behaviour policy that covers pi's trajectories, biased
for a small batch, and only as good as the effective sample size `kl_snis_ess` (1 / sum w_i^2, in trajectories).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from buffer.client import BatchStream, ReplayTable
from buffer.schema import SampledItem
from learner.loss import TRAJ_PREFIX


class ResidualLog:
    """Per-trajectory loss outputs of one step, keyed by item id: (delta, log pi/pi_ref, log pi/mu)."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[float, float, float]] = {}

    def add(self, items: list[SampledItem], rows: list[int], metrics: dict[str, Tensor]) -> None:
        """Record the `traj_*` outputs of a micro-batch whose row r is `items[rows[r]]` (no-op for other losses)."""
        residual = metrics.get(TRAJ_PREFIX + "residual")
        if residual is None:
            return
        log_ratio = metrics[TRAJ_PREFIX + "log_ratio_sum"].tolist()
        for r, (i, delta) in enumerate(zip(rows, residual.tolist(), strict=True)):
            t = items[i].trajectory
            # log pi(tau) - log mu(tau) = [log pi - log pi_ref] + log pi_ref - log mu, all summed over tokens
            log_w = log_ratio[r] + sum(t.ref_logprobs or []) - sum(t.behaviour_logprobs)
            self.values[items[i].info.item_id] = (delta, log_ratio[r], log_w)

    def gathered(self, world_size: int) -> dict[str, tuple[float, float, float]]:
        """Every rank's values (each rank holds its own shard); the same dict on every rank."""
        if world_size == 1:
            return self.values
        parts: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(parts, self.values)
        return {k: v for part in parts for k, v in part.items()}


def write_priorities(
    table: ReplayTable | BatchStream, values: dict[str, tuple[float, float, float]], eps: float
) -> int:
    """p_i = |delta_i| + eps for every trained item, in one buffer call (rank 0's `BatchStream` sends it with the
    next step's round trip, before that round trip's lease); returns how many were sent."""
    prio = {item_id: abs(delta) + eps for item_id, (delta, _, _) in values.items() if math.isfinite(delta)}
    if prio:
        table.update_priorities(prio)
    return len(prio)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def residual_metrics(items: list[SampledItem], values: dict[str, tuple[float, float, float]]) -> dict[str, float]:
    """Residual and log-ratio by reward class (correct = reward > 0), and the self-normalized IS estimate of
    KL(pi || pi_ref) with its effective sample size. Classes absent from the batch are left out."""
    out: dict[str, float] = {}
    by_class: dict[str, list[tuple[float, float, float]]] = {"correct": [], "incorrect": []}
    for it in items:
        v = values.get(it.info.item_id)
        if v is not None and all(math.isfinite(x) for x in v):
            by_class["correct" if it.trajectory.reward > 0 else "incorrect"].append(v)
    for cls, vs in by_class.items():
        if vs:
            out[f"residual_mean_{cls}"] = _mean([v[0] for v in vs])
            out[f"log_ratio_sum_mean_{cls}"] = _mean([v[1] for v in vs])
    every = by_class["correct"] + by_class["incorrect"]
    if every:
        log_w = torch.tensor([v[2] for v in every], dtype=torch.float64)
        w = torch.softmax(log_w, dim=0)  # self-normalized: w_i = pi/mu / sum_j pi/mu
        out["kl_snis"] = float((w * torch.tensor([v[1] for v in every], dtype=torch.float64)).sum())
        out["kl_snis_ess"] = float(1.0 / (w * w).sum())
    return out


def age_metrics(items: list[SampledItem], now: float | None = None) -> dict[str, float]:
    """Age of the trained data: in learner versions (`version_lag_*`, see `batch_metrics`) and in seconds since
    the trajectory was generated (`age_s_*`)."""
    now = time.time() if now is None else now
    ages = [max(0.0, now - it.trajectory.created_at) for it in items]
    return {"age_s_mean": sum(ages) / len(ages), "age_s_max": max(ages)}
