"""Typed choice of the learner's objective: a discriminated union on `kind` (no torch here).

The learner settings (`learner/settings.py`) hold one `LossConfig`; `learner.loss.compute_loss` dispatches on it.
In a run TOML it reads e.g. `[learner.loss] kind = "tbrm"  beta = 0.002`, in the environment
`TBRM_LEARNER_LOSS='{"kind": "grpo", "clip_eps": 0.2}'`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class TbrmLossConfig(BaseModel):
    """Trajectory Bellman Residual Minimization (docs/loss.md, arXiv 2505.15311)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tbrm"] = "tbrm"
    beta: float = Field(default=0.002, gt=0.0)
    """KL-regularization strength; the residual compares the summed log-ratio with r(tau)/beta (paper: 0.002)."""
    calibrated: bool = False
    """Subtract the reference model's V_ref(s_1) = logsumexp(reference logits at s_1) inside the residual, so that
    pi = pi_ref and r = 0 give zero loss (needs `ref_v0` per trajectory). Off by default (the paper's objective)."""
    centered: bool = False
    """Solve V(s_1) in closed form per prompt group instead of reading it off the logits: each residual has its
    group's mean subtracted, so the loss is the within-group variance of delta (needs n_samples_per_prompt >= 2;
    a trajectory alone in its group gives no gradient). Same optimum policy; the reward term no longer dwarfs the
    wrong answers' pull (docs/loss.md, "Centered residuals")."""

    @property
    def needs_ref_logprobs(self) -> bool:
        """The learner must run (or read from the cache) the reference forward for this loss."""
        return True

    @property
    def needs_ref_v0(self) -> bool:
        return self.calibrated

    @property
    def needs_groups(self) -> bool:
        """The loss compares the samples of one prompt: micro-batches and ranks must hold whole groups."""
        return self.centered


class GrpoLossConfig(BaseModel):
    """GRPO baseline: group-normalized outcome advantages, PPO-clipped ratio to the behaviour policy."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["grpo"] = "grpo"
    clip_eps: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Lower clip: the ratio pi/pi_behaviour is clipped to [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = Field(default=None, gt=0.0)
    """Upper clip (DAPO's clip-higher); None means the same as `clip_eps`."""
    adv_eps: float = Field(default=1e-6, gt=0.0)
    """Added to the group's reward std before dividing, so groups with identical rewards give advantage 0."""
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"
    """`token_mean`: mean over every response token of the batch (DAPO / verl default, long answers weigh more);
    `seq_mean_token_mean`: mean over tokens inside each sequence, then over sequences (the original GRPO)."""
    kl_coef: float = Field(default=0.0, ge=0.0)
    """Weight of a k3 KL penalty to the reference policy (0 = none, then no reference forward is needed)."""

    @property
    def needs_ref_logprobs(self) -> bool:
        return self.kl_coef > 0.0

    @property
    def needs_ref_v0(self) -> bool:
        return False

    @property
    def needs_groups(self) -> bool:
        return True


class SftLossConfig(BaseModel):
    """Plain masked next-token NLL on the response tokens (warm-up and the benchmark's baseline step)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sft"] = "sft"

    @property
    def needs_ref_logprobs(self) -> bool:
        return False

    @property
    def needs_ref_v0(self) -> bool:
        return False

    @property
    def needs_groups(self) -> bool:
        return False


LossConfig = Annotated[TbrmLossConfig | GrpoLossConfig | SftLossConfig, Field(discriminator="kind")]
"""The loss choice; pydantic picks the variant from `kind`."""
