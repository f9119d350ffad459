"""The stability guard: no non-finite update is applied or published, and a blow-up gets an answer.

TBRM at the paper's beta works with residuals in the hundreds (r/beta = 500), every step is gradient-clipped, and a
too-large lr can still push the policy off a cliff: on the toy at constant lr 1e-4 the policy's log pi/pi_ref on
wrong answers jumped to +200 after ~2,000 steps and accuracy fell to zero. The guard watches two things:

1. **Non-finite steps** (always on): a non-finite micro-batch loss or gradient skips the optimizer step (gradients
   discarded, version not advanced, the batch's lease left to expire so its items return to the buffer), and
   weights that are not finite are never exported.
2. **Blow-ups**: a batch whose largest |residual| exceeds `max_residual_abs`, or whose mean log-ratio on
   trajectories with reward <= 0 exceeds `max_log_ratio_incorrect`, is a strike; `patience_steps` strikes in a row
   trigger the configured response (lr back-off, or rollback plus lr back-off, or a warning) and reset the count.

A strike at step k is measured on the weights after step k - 1 (the residual comes from the step's forward pass),
so those weights — and a checkpoint taken of them — are already suspect: a rollback restores the newest checkpoint
from before the first strike's weights, i.e. of step <= first_strike_step - 2 (keep_checkpoints >= 2 keeps one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from buffer.client import ReplayTable
from learner.settings import GuardSettings

log = logging.getLogger(__name__)


class StabilityGuard:
    """Counts strikes and skipped steps; `observe` says when to respond (the loop carries the response out)."""

    def __init__(self, cfg: GuardSettings) -> None:
        self.cfg = cfg
        self.strikes = 0
        self.first_strike_step = 0
        """Step of the first strike of the current series (its weights are the first suspect ones)."""
        self.skipped_steps = 0
        self.responses = 0

    def blow_up_reason(self, metrics: dict[str, float]) -> str | None:
        """Why this step's metrics count as a blow-up, or None."""
        res = metrics.get("residual_abs_max")
        if self.cfg.max_residual_abs is not None and res is not None and not res <= self.cfg.max_residual_abs:
            return f"residual_abs_max {res:.4g} > {self.cfg.max_residual_abs:g}"
        lr_bad = metrics.get("log_ratio_sum_mean_incorrect")
        bound = self.cfg.max_log_ratio_incorrect
        if bound is not None and lr_bad is not None and not lr_bad <= bound:
            return f"log_ratio_sum_mean_incorrect {lr_bad:.4g} > {bound:g}"
        return None

    def observe(self, metrics: dict[str, float], step: int) -> str | None:
        """Record trained step `step`; returns the response to carry out now ("lr_backoff", "rollback", "warn")."""
        reason = self.blow_up_reason(metrics)
        if reason is None:
            self.strikes = 0
            return None
        return self.strike(step, reason)

    def strike(self, step: int, reason: str) -> str | None:
        """Count a bad step (a blow-up, or a skipped non-finite one); the response once patience runs out."""
        if self.strikes == 0:
            self.first_strike_step = step
        self.strikes += 1
        log.warning("stability guard: %s at step %d (strike %d/%d)", reason, step, self.strikes,
                    self.cfg.patience_steps)
        if self.strikes < self.cfg.patience_steps:
            return None
        self.strikes = 0
        self.responses += 1
        return self.cfg.response

    @property
    def safe_step(self) -> int:
        """Newest step whose weights predate the current strike series (a rollback target)."""
        return self.first_strike_step - 2

    def metrics(self) -> dict[str, float]:
        return {"guard_strikes": float(self.strikes), "guard_skipped_steps": float(self.skipped_steps),
                "guard_responses": float(self.responses)}


def grad_norm(module: torch.nn.Module) -> float | None:
    """Global L2 norm of the gradients held on the parameters, before clipping (inf/nan if any is not finite);
    None when the parameters hold none (ZeRO-2 keeps reduced gradients in the optimizer's partitions: then only
    the loss check and the weight check before export apply, and DeepSpeed reports the norm itself)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else None


def params_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter is finite (checked before weights are exported to the actors).

    One host synchronisation for the whole model (a per-tensor `bool(...)` would wait on the device once per
    parameter)."""
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def all_ranks_agree(ok: bool, world_size: int) -> bool:
    """True only if `ok` holds on every rank (so that all ranks skip or step together)."""
    if world_size == 1:
        return ok
    t = torch.tensor([1.0 if ok else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t[0] > 0)


def scale_lr(engine: Any, factor: float) -> float:
    """Multiply the lr schedule's base (and the current lr) by `factor`; returns the new current lr.

    The base lrs live in the LambdaLR scheduler, whose state DeepSpeed checkpoints, so a back-off survives resume."""
    sched = engine.lr_scheduler
    sched.base_lrs = [b * factor for b in sched.base_lrs]
    for group in engine.optimizer.param_groups:
        group["lr"] *= factor
    return float(engine.optimizer.param_groups[0]["lr"])


def skip_step(
    engine: Any, guard: StabilityGuard, table: ReplayTable | None, leases: list[str],
    values: dict[str, tuple[float, float, float]], step: int,
) -> str | None:
    """Discard a non-finite step's gradients; returns the guard's response if this was one strike too many.

    Items whose own residual is not finite are poison (e.g. an absurd reward) and are acked away (by rank 0, the
    one given the `table`) so they cannot stall the learner; the others' leases expire and they come back."""
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
    response: str, engine: Any, ckpt_dir: Path, ack_held: Callable[[], Any], lr_backoff_factor: float,
    version: int, publish: Callable[[int], Any], safe_step: int,
) -> int:
    """Carry out the guard's response; returns the policy version to continue from.

    rollback: restore the newest checkpoint of a step <= `safe_step` (model, optimizer, scheduler) on every rank,
    then back off the lr. The batches held since the last checkpoint are acked (`ack_held`; their updates are discarded with
    the diverged weights rather than retrained), and the restored weights are published as a NEW version (versions
    never repeat or go back; `publish` exports on rank 0 and does nothing on the others). Without such a
    checkpoint, a rollback is an lr back-off only."""
    tag = checkpoint_at_or_before(ckpt_dir, safe_step) if response == "rollback" else None
    if tag is None and not params_finite(engine.module):
        raise RuntimeError("the weights are not finite and there is no checkpoint to roll back to")
    if tag is not None:
        base = list(engine.lr_scheduler.base_lrs)
        engine.load_checkpoint(str(ckpt_dir), tag=tag)
        engine.lr_scheduler.base_lrs = base  # keep earlier back-offs; the checkpoint's base predates them
        ack_held()
    lr = scale_lr(engine, lr_backoff_factor)
    log.warning("stability guard: %s (checkpoint %s), lr now %.3g", response, tag or "none", lr)
    if tag is None:
        return version
    version += 1
    publish(version)
    return version
