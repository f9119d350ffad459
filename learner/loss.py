"""The learner's objectives as pure functions: tensors in, `(loss, metrics)` out.

* `tbrm_loss`  — Trajectory Bellman Residual Minimization (Yuan et al. 2025, arXiv 2505.15311), docs/loss.md.
* `grpo_loss`  — the GRPO baseline (group-normalized outcome advantages, PPO-clipped ratio to the behaviour policy).
* `sft_loss`   — masked next-token NLL (warm-up, and the benchmark's "plain supervised step").
* `compute_loss(config, logits, batch)` dispatches on a `learner.loss_config.LossConfig`.

Conventions shared by every function (B trajectories, T response positions, V vocabulary):
  logits [B, T, V]  policy logits at the T positions that PREDICT the response tokens, so logits[:, h] is the state
                    s_{h+1} (prompt + a_1..a_h) and logits[:, 0] is s_1, the last prompt position. The caller slices
                    them out of the model's output (left-aligned: response token h sits at column h).
  tokens [B, T]     response token ids a_1..a_T (any value, e.g. -100 or 0, where mask is 0).
  mask   [B, T]     1/True for real response tokens, 0 for padding.
All maths runs in fp32 whatever the logits dtype (fp64 stays fp64). Metrics are detached 0-dim tensors: call
`float()` to log them (keeping them tensors avoids a device sync per metric per step). Keys starting with
`TRAJ_PREFIX` ("traj_") are the exception: detached per-trajectory [B] tensors (TBRM's residual and log-ratio),
which the learner turns into replay priorities and per-reward-class metrics instead of averaging them.

Memory: the only [B, T, V]-sized work is one `logsumexp` over the vocabulary plus a `gather` of the token logits
(`token_logprobs`); no log-softmax [B, T, V] copy is kept, and V(s_1) is the first column of the same logsumexp
(its backward builds the softmax once, as any cross-entropy does). bf16/fp16 logits are upcast to fp32 once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from learner.loss_config import GrpoLossConfig, LossConfig, SftLossConfig, TbrmLossConfig

Metrics = dict[str, Tensor]
TRAJ_PREFIX = "traj_"


def _f32(x: Tensor) -> Tensor:
    """At least fp32: half/bfloat16 are upcast, float64 is kept (exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_shapes(
    logits: Tensor, tokens: Tensor, mask: Tensor, **per_token: Tensor | None
) -> tuple[int, int]:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    b, t, _ = logits.shape
    for name, x in {"tokens": tokens, "mask": mask, **per_token}.items():
        if x is not None and tuple(x.shape) != (b, t):
            raise ValueError(f"{name} must be [B, T] = {(b, t)} like logits[..., 0], got {tuple(x.shape)}")
    if t == 0:
        raise ValueError("need at least one response position (T >= 1): logits[:, 0] is the state s_1")
    return b, t


def _check_per_seq(b: int, **per_seq: Tensor | None) -> None:
    for name, x in per_seq.items():
        if x is not None and tuple(x.shape) != (b,):
            raise ValueError(f"{name} must be [B] = ({b},), got {tuple(x.shape)}")


def token_logprobs(logits: Tensor, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log pi(a_h | s_h) of the given tokens and the soft value V(s_1) = logsumexp(logits[:, 0]).

    Returns `(logprobs [B, T], v0 [B])` in fp32, differentiable. Positions with mask 0 gather token 0 (their value is
    meaningless; callers mask them). Use it under `torch.no_grad()` on the reference model's logits to get the
    `ref_logprobs` and `ref_v0` that `tbrm_loss` takes.
    """
    if mask is not None:
        tokens = torch.where(mask.bool(), tokens, torch.zeros_like(tokens))  # padding ids may be -100
    lse = torch.logsumexp(_f32(logits), dim=-1)  # [B, T]   log Z(s_h)
    picked = _f32(logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1))  # [B, T]   z_h[a_h]
    return picked - lse, lse[:, 0]  # [B, T], [B]


def tbrm_residual(
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    beta: float,
    ref_v0: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-trajectory Bellman residual delta(tau) [B] (with graph) and its parts (v0, log_ratio_sum, length).

    Same arguments as `tbrm_loss`; useful on its own for priorities (|delta|) in the replay buffer.
    """
    b, _ = _check_shapes(logits, tokens, mask, ref_logprobs=ref_logprobs)
    _check_per_seq(b, rewards=rewards, ref_v0=ref_v0)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    valid = mask.bool()  # [B, T]
    logp, v0 = token_logprobs(logits, tokens, valid)  # [B, T], [B]
    # torch.where, not a product: padded ref log-probs may be nan/inf and must not leak into the sum.
    log_ratio = torch.where(valid, logp - ref_logprobs.to(logp.dtype), torch.zeros_like(logp))  # [B, T]
    log_ratio_sum = log_ratio.sum(dim=1)  # [B]   log pi(tau)/pi_ref(tau): SUMMED, never length-normalized
    residual = v0 + log_ratio_sum - rewards.to(v0.dtype) / beta  # [B]
    if ref_v0 is not None:
        residual = residual - ref_v0.to(v0.dtype)  # calibrated variant: zero at pi = pi_ref, r = 0
    parts = {"v0": v0, "log_ratio_sum": log_ratio_sum, "length": valid.sum(dim=1).float()}
    return residual, parts


def tbrm_loss(
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor,
    rewards: Tensor,
    beta: float,
    ref_v0: Tensor | None = None,
    group_ids: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    r"""TBRM: one squared trajectory-level Bellman residual per trajectory (arXiv 2505.15311, docs/loss.md).

        delta(tau) = V(s_1) + sum_h mask_h * [log pi(a_h|s_h) - log pi_ref(a_h|s_h)] - r(tau)/beta  [- V_ref(s_1)]
        L          = mean_tau delta(tau)^2

    with z_h = logits[:, h-1], V(s_1) = logsumexp(z_1) and log pi(a_h|s_h) = z_h[a_h] - logsumexp(z_h). Gradients flow
    through V(s_1) and every log pi: no stop-gradient, critic, importance ratio or clipping, and no behaviour
    log-probs — the objective is valid for trajectories from ANY behaviour policy (the paper's Theorem 2).

    Why V(s_1) = logsumexp(z_1) is the right value in the token MDP (deterministic transitions, outcome reward r):
    read the logits as a soft Q-function Q_beta with Q_beta(s, a)/beta = z(s, a) - log pi_ref(a|s). Its soft value
    V_beta(s) = beta log sum_a pi_ref(a|s) exp(Q_beta(s, a)/beta) = beta logsumexp(z(s)), so V(s) := logsumexp(z(s))
    is V_beta(s)/beta (beta is not inside V), and the induced policy
    pi(a|s) = pi_ref(a|s) exp((Q_beta(s, a) - V_beta(s))/beta) = softmax(z(s)) is the model's own softmax. Summing the
    one-step residuals Q_beta(s_h, a_h) - [r_h + V_beta(s_{h+1})] along tau (V_beta = 0 after the end, r only at
    the end) telescopes every interior value away and leaves
        sum_h [Q_beta(s_h, a_h) - V_beta(s_h)] + V_beta(s_1) - r(tau) = beta * delta(tau).
    delta = 0 on every trajectory iff pi(tau) = pi_ref(tau) exp(r(tau)/beta - V(s_1)); normalizing over tau forces
    V(s_1) = log E_{pi_ref}[exp(r/beta)], so pi(tau) = pi*(tau) ∝ pi_ref(tau) exp(r(tau)/beta), the KL-regularized
    optimum, whatever distribution the trajectories came from (as long as it covers them). With the calibrated
    variant the constant becomes V(s_1) - V_ref(s_1) and the optimum is the same. tests/unit/learner_loss checks
    this on a tabular tree MDP, and that dropping V, detaching V or length-normalizing the sum does not get there.

    Args (see the module docstring for the logits/tokens/mask convention):
        ref_logprobs [B, T]: log pi_ref(a_h|s_h) of `tokens` from the frozen reference (no grad needed).
        rewards [B]: outcome reward r(tau).
        beta: KL-regularization strength (> 0); the paper uses 0.002, so r/beta is in the hundreds.
        ref_v0 [B] or None: V_ref(s_1) = logsumexp(reference logits at s_1); given = the calibrated variant.
        group_ids [B] int or None: given = the centered variant. The samples of one prompt share s_1, so V(s_1)
            is one free number per group; minimizing the loss over it in closed form subtracts the group's mean
            residual, and L = mean_tau (delta - mean_group delta)^2. Every zero-loss policy is still pi* (equal
            residuals within a prompt are exactly pi(tau) ∝ pi_ref(tau) exp(r/beta)); V(s_1) itself gets no gradient
            and a trajectory alone in its group none at all. The reported residuals are the centered ones.

    Returns `(loss, metrics)`: scalar fp32 loss; metrics (detached): loss, residual_mean/std/abs_max, v0_mean,
    log_ratio_sum_mean (sum_h log pi/pi_ref: a KL(pi||pi_ref) estimate when the data is on-policy), reward_mean,
    response_length_mean, ref_v0_mean for the calibrated variant, flat_group_frac for the centered one; per
    trajectory ([B], detached): traj_residual (delta, whose |delta| becomes the replay priority) and traj_log_ratio_sum.
    """
    residual, parts = tbrm_residual(logits, tokens, mask, ref_logprobs, rewards, beta, ref_v0)
    if group_ids is not None:  # V(s_1) minimized out per group: min_b mean_g (delta + b)^2 at b = -mean_g delta
        _check_per_seq(len(residual), group_ids=group_ids)
        residual = residual - group_mean(residual, group_ids)
    loss = residual.pow(2).mean()
    with torch.no_grad():
        r = residual.detach()
        metrics: Metrics = {
            "loss": loss.detach(),
            "residual_mean": r.mean(),
            "residual_std": r.std(unbiased=False),
            "residual_abs_max": r.abs().max(),
            "v0_mean": parts["v0"].detach().mean(),
            "log_ratio_sum_mean": parts["log_ratio_sum"].detach().mean(),
            "reward_mean": rewards.detach().float().mean(),
            "response_length_mean": parts["length"].mean(),
            TRAJ_PREFIX + "residual": r,
            TRAJ_PREFIX + "log_ratio_sum": parts["log_ratio_sum"].detach(),
        }
        if ref_v0 is not None:
            metrics["ref_v0_mean"] = ref_v0.detach().float().mean()
        if group_ids is not None:
            metrics["flat_group_frac"] = flat_group_frac(rewards, group_ids)
    return loss, metrics


def _dense_groups(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(inverse [B] dense group index, count [G] members per group, fp32) of integer group ids."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(inv.max().item()) + 1, dtype=torch.float32, device=group_ids.device)
    return inv, count.index_add_(0, inv, torch.ones_like(inv, dtype=torch.float32))


def group_mean(x: Tensor, group_ids: Tensor) -> Tensor:
    """[B] the mean of x over each trajectory's group (differentiable in x)."""
    inv, count = _dense_groups(group_ids)
    total = torch.zeros(count.shape, dtype=x.dtype, device=x.device).index_add(0, inv, x)
    return (total / count.to(x.dtype))[inv]


def flat_group_frac(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Fraction of the trajectories whose group's rewards are all equal (a group of one included): the samples a
    group-relative loss (GRPO, centered TBRM) learns nothing from the reward of. 0-dim, no grad."""
    r = rewards.detach().float()
    spread = group_mean((r - group_mean(r, group_ids)).abs(), group_ids)  # [B] 0 iff the group agrees
    return (spread == 0).float().mean()


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantages A_i = (r_i - mean_g r) / (std_g r + eps) over the trajectories sharing a group id.

    rewards [B] float, group_ids [B] integer (the learner maps `Trajectory.group_id` strings to ints). std is the
    unbiased sample std (as in GRPO / verl); a group of one gets advantage 0 (nothing to compare it with), and so
    does a group whose rewards are all equal. Returns [B] fp32, no grad.
    """
    rewards = rewards.detach().float()
    inv, count = _dense_groups(group_ids)
    centered = rewards - group_mean(rewards, group_ids)  # [B]
    var = torch.zeros_like(count).index_add_(0, inv, centered.pow(2)) / (count - 1).clamp(min=1)  # [G]
    std = var.sqrt()[inv]  # [B]
    # where(): a group with identical rewards (std 0) has no signal; without it eps = 0 would give 0/0.
    return torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))  # [B]


def grpo_loss(
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    behaviour_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    adv_eps: float = 1e-6,
    aggregation: str = "token_mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, Metrics]:
    r"""GRPO (Shao et al. 2024, arXiv 2402.03300) with a PPO-clipped ratio to the stored behaviour log-probs.

        A_i       = (r_i - mean_g r) / (std_g r + adv_eps)                       (one advantage per trajectory)
        rho_{i,h} = exp(log pi(a_h|s_h) - log pi_behaviour(a_h|s_h))
        l_{i,h}   = -min(rho A_i, clip(rho, 1 - clip_eps, 1 + clip_eps_high) A_i) [+ kl_coef * k3(pi, pi_ref)]
        k3        = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1         (only when kl_coef > 0)

    Aggregation over masked tokens: `token_mean` (default) = sum_{i,h} l / number of response tokens in the batch
    (DAPO / verl's default; every token weighs the same); `seq_mean_token_mean` = mean over sequences of each
    sequence's token mean (the original GRPO; every trajectory weighs the same).

    Args: behaviour_logprobs [B, T] (the actor's log-probs of `tokens`), rewards [B], group_ids [B] int,
    ref_logprobs [B, T] (needed only when kl_coef > 0); logits/tokens/mask as in the module docstring.
    Returns `(loss, metrics)`: loss, reward_mean, advantage_abs_mean, flat_group_frac, ratio_mean, clip_frac
    (fraction of tokens whose clipped term is the active one), behaviour_kl (k3 estimate of KL(pi_b || pi)), ref_kl
    (when kl_coef > 0), response_length_mean.
    """
    b, _ = _check_shapes(
        logits, tokens, mask, behaviour_logprobs=behaviour_logprobs, ref_logprobs=ref_logprobs
    )
    _check_per_seq(b, rewards=rewards, group_ids=group_ids)
    if aggregation not in ("token_mean", "seq_mean_token_mean"):
        raise ValueError(f"aggregation must be 'token_mean' or 'seq_mean_token_mean', got {aggregation!r}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    valid = mask.bool()  # [B, T]
    logp, _ = token_logprobs(logits, tokens, valid)  # [B, T]
    validf = valid.to(logp.dtype)
    zeros = torch.zeros_like(logp)
    adv = group_advantages(rewards, group_ids, adv_eps)  # [B]
    log_ratio = torch.where(valid, logp - behaviour_logprobs.to(logp.dtype), zeros)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    a = adv.to(logp.dtype).unsqueeze(1)  # [B, 1]
    unclipped = -ratio * a
    clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + hi) * a
    per_token = torch.maximum(unclipped, clipped)  # [B, T]   pessimistic bound
    if kl_coef > 0:
        d = torch.where(valid, ref_logprobs.to(logp.dtype) - logp, zeros)  # [B, T]
        ref_k3 = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * ref_k3
    per_token = per_token * validf

    n_tok = validf.sum(dim=1)  # [B]
    if aggregation == "token_mean":
        loss = per_token.sum() / n_tok.sum().clamp(min=1.0)
    else:
        loss = (per_token.sum(dim=1) / n_tok.clamp(min=1.0)).mean()

    with torch.no_grad():
        total = n_tok.sum().clamp(min=1.0)
        lr = log_ratio.detach()
        metrics: Metrics = {
            "loss": loss.detach(),
            "reward_mean": rewards.detach().float().mean(),
            "advantage_abs_mean": adv.abs().mean(),
            "flat_group_frac": flat_group_frac(rewards, group_ids),
            "ratio_mean": (ratio.detach() * validf).sum() / total,
            "clip_frac": ((clipped.detach() > unclipped.detach()).float() * validf).sum() / total,
            "behaviour_kl": ((torch.exp(-lr) + lr - 1.0) * validf).sum() / total,
            "response_length_mean": n_tok.mean(),
        }
        if kl_coef > 0:
            metrics["ref_kl"] = (ref_k3.detach() * validf).sum() / total
    return loss, metrics


def sft_loss(logits: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Metrics]:
    """Masked next-token NLL, mean over response tokens: L = -sum_{i,h} mask log pi(a_h|s_h) / sum mask."""
    _check_shapes(logits, tokens, mask)
    valid = mask.bool()
    logp, _ = token_logprobs(logits, tokens, valid)  # [B, T]
    n = valid.sum().clamp(min=1)
    loss = -torch.where(valid, logp, torch.zeros_like(logp)).sum() / n
    with torch.no_grad():
        metrics: Metrics = {
            "loss": loss.detach(),
            "response_length_mean": valid.sum(dim=1).float().mean(),
        }
    return loss, metrics


@dataclass
class LossBatch:
    """Everything but the logits that a loss may need; shapes as in the module docstring."""

    tokens: Tensor  # [B, T]
    mask: Tensor  # [B, T]
    rewards: Tensor  # [B]
    ref_logprobs: Tensor | None = None  # [B, T]  tbrm; grpo with kl_coef > 0
    ref_v0: Tensor | None = None  # [B]  tbrm calibrated
    behaviour_logprobs: Tensor | None = None  # [B, T]  grpo
    group_ids: Tensor | None = None  # [B] int  grpo


def compute_loss(config: LossConfig, logits: Tensor, batch: LossBatch) -> tuple[Tensor, Metrics]:
    """Dispatch on the loss config (a discriminated union); raises ValueError when the batch lacks an input."""

    def need(name: str) -> Tensor:
        x = getattr(batch, name)
        if x is None:
            raise ValueError(f"loss kind {config.kind!r} needs batch.{name}")
        return x

    if isinstance(config, TbrmLossConfig):
        ref_v0 = need("ref_v0") if config.calibrated else None
        return tbrm_loss(
            logits, batch.tokens, batch.mask, need("ref_logprobs"), batch.rewards, config.beta, ref_v0=ref_v0,
            group_ids=need("group_ids") if config.centered else None,
        )
    if isinstance(config, GrpoLossConfig):
        return grpo_loss(
            logits,
            batch.tokens,
            batch.mask,
            need("behaviour_logprobs"),
            batch.rewards,
            need("group_ids"),
            clip_eps=config.clip_eps,
            clip_eps_high=config.clip_eps_high,
            adv_eps=config.adv_eps,
            aggregation=config.aggregation,
            ref_logprobs=need("ref_logprobs") if config.kl_coef > 0 else None,
            kl_coef=config.kl_coef,
        )
    if isinstance(config, SftLossConfig):
        return sft_loss(logits, batch.tokens, batch.mask)
    raise TypeError(f"unknown loss config {type(config).__name__}")
