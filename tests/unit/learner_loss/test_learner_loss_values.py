"""Hand-computed values, gradients, masking and dispatch of learner.loss (TBRM, GRPO, SFT)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from learner.loss import (
    LossBatch,
    compute_loss,
    group_advantages,
    grpo_loss,
    sft_loss,
    tbrm_loss,
    tbrm_residual,
    token_logprobs,
)
from learner.loss_config import GrpoLossConfig, LossConfig, SftLossConfig, TbrmLossConfig

LN = math.log


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_batch() -> dict[str, torch.Tensor]:
    """Two trajectories over a 3-token vocabulary, worked out on paper.

    tau_0 = (a_1=1, a_2=1), r = 1:  z_1 = [0, 0, 0]      -> V(s_1) = ln 3, pi(1|s_1) = 1/3, pi_ref = 1/2
                                    z_2 = [0, ln 2, 0]   -> pi(1|s_2) = 2/4 = 1/2,          pi_ref = 1/4
        delta_0 = ln 3 + (ln 1/3 - ln 1/2) + (ln 1/2 - ln 1/4) - 1/0.5 = 2 ln 2 - 2
    tau_1 = (a_1=0), r = 0, one token (position 2 is padding with garbage logits, token -100 and a nan ref):
                                    z_1 = [ln 4, 0, 0]   -> V(s_1) = ln 6, pi(0|s_1) = 4/6, pi_ref = 1/3
        delta_1 = ln 6 + ln(2/3) - ln(1/3) - 0 = ln 12
    """
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [0.0, LN(2), 0.0]],
            [[LN(4), 0.0, 0.0], [5.0, -7.0, 11.0]],
        ]
    )
    return {
        "logits": logits,
        "tokens": torch.tensor([[1, 1], [0, -100]]),
        "mask": torch.tensor([[1, 1], [1, 0]]),
        "ref_logprobs": torch.tensor([[LN(1 / 2), LN(1 / 4)], [LN(1 / 3), float("nan")]]),
        "rewards": torch.tensor([1.0, 0.0]),
    }


BETA = 0.5
DELTA = [2 * LN(2) - 2, LN(12)]


def test_tbrm_hand_computed_values() -> None:
    b = hand_batch()
    loss, m = tbrm_loss(b["logits"], b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA)
    assert loss.shape == ()
    assert loss.item() == pytest.approx((DELTA[0] ** 2 + DELTA[1] ** 2) / 2, rel=1e-6)
    assert m["residual_mean"].item() == pytest.approx((DELTA[0] + DELTA[1]) / 2, rel=1e-6)
    assert m["residual_std"].item() == pytest.approx(abs(DELTA[1] - DELTA[0]) / 2, rel=1e-6)
    assert m["residual_abs_max"].item() == pytest.approx(LN(12), rel=1e-6)
    assert m["v0_mean"].item() == pytest.approx((LN(3) + LN(6)) / 2, rel=1e-6)
    # summed log-ratios: tau_0: ln(2/3) + ln 2 = ln(4/3); tau_1: ln 2
    assert m["log_ratio_sum_mean"].item() == pytest.approx((LN(4 / 3) + LN(2)) / 2, rel=1e-6)
    assert m["reward_mean"].item() == pytest.approx(0.5)
    assert m["response_length_mean"].item() == pytest.approx(1.5)
    assert all(not v.requires_grad for v in m.values())


def test_tbrm_calibrated_subtracts_ref_v0() -> None:
    b = hand_batch()
    ref_v0 = torch.tensor([0.25, -1.5])
    loss, m = tbrm_loss(
        b["logits"], b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA, ref_v0=ref_v0
    )
    expected = ((DELTA[0] - 0.25) ** 2 + (DELTA[1] + 1.5) ** 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["ref_v0_mean"].item() == pytest.approx(-0.625)


def test_tbrm_centered_subtracts_the_group_mean_residual() -> None:
    """Group ids given: delta minus its group's mean. Both hand trajectories in one group -> +-(d1 - d0)/2; each in
    a group of its own -> zero loss and zero gradient (nothing to compare a lone sample with)."""
    b = hand_batch()
    args = (b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA)
    logits = b["logits"].clone().requires_grad_(True)
    loss, m = tbrm_loss(logits, *args, group_ids=torch.tensor([7, 7]))
    half = (DELTA[1] - DELTA[0]) / 2
    assert loss.item() == pytest.approx(half**2, rel=1e-6)
    assert m["traj_residual"].tolist() == pytest.approx([-half, half], rel=1e-6)
    assert m["flat_group_frac"].item() == 0.0  # rewards 1 and 0: the group has a signal
    loss.backward()
    # d loss/d z_1 = sum_i (delta_i - mean) * d delta_i/d z_1: the V(s_1) terms of the two cancel only in the mean
    # over a shared start state; here each row has its own z_1, so both rows get a gradient.
    assert logits.grad[0, 0].abs().sum() > 0 and logits.grad[1, 0].abs().sum() > 0

    alone = b["logits"].clone().requires_grad_(True)
    loss, m = tbrm_loss(alone, *args, group_ids=torch.tensor([0, 1]))
    assert loss.item() == 0.0 and m["traj_residual"].abs().max().item() == 0.0 and m["flat_group_frac"].item() == 1.0
    loss.backward()
    assert alone.grad.abs().max().item() == 0.0
    with pytest.raises(ValueError, match=r"group_ids must be \[B\]"):
        tbrm_loss(b["logits"], *args, group_ids=torch.tensor([0, 0, 1]))


def test_tbrm_centered_ignores_the_level_of_v_s1() -> None:
    """Within a group every sample starts in the same state: shifting the logits at s_1 by a constant moves V(s_1)
    and leaves the policy, and so the centered loss, unchanged (the uncentered one moves)."""
    b = hand_batch()
    logits = b["logits"].clone()
    logits[1, 0] = logits[0, 0]  # both rows start in the same state s_1
    shifted = logits.clone()
    shifted[:, 0] += 3.0
    args = (b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA)
    same = torch.tensor([0, 0])
    assert tbrm_loss(shifted, *args, group_ids=same)[0].item() == pytest.approx(
        tbrm_loss(logits, *args, group_ids=same)[0].item(), rel=1e-6
    )
    assert tbrm_loss(shifted, *args)[0].item() != pytest.approx(tbrm_loss(logits, *args)[0].item(), rel=1e-3)


def test_tbrm_beta_scales_reward_term() -> None:
    b = hand_batch()
    residual, _ = tbrm_residual(b["logits"], b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], 0.002)
    assert residual[0].item() == pytest.approx(2 * LN(2) - 500.0, rel=1e-6)  # r/beta = 500 (the paper's beta)
    assert residual[1].item() == pytest.approx(LN(12), rel=1e-6)


def test_tbrm_gradient_flows_through_v_s1() -> None:
    """d delta / d z_1 = d[V(s_1) + log pi(a_1|s_1)] / d z_1 = softmax(z_1) + (e_{a_1} - softmax(z_1)) = e_{a_1}:
    the softmax term of V(s_1) cancels the one of log pi(a_1|s_1). A stop-gradient on V (or no V) leaves
    e_{a_1} - softmax(z_1) instead. Later positions get e_{a_h} - softmax(z_h); padding gets nothing."""
    b = hand_batch()
    logits = b["logits"].clone().requires_grad_(True)
    loss, _ = tbrm_loss(logits, b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA)
    loss.backward()
    g = logits.grad
    n = 2  # mean over trajectories
    # tau_0, position 1 (state s_1, token 1): 2 delta_0 / n * e_1
    assert g[0, 0].tolist() == pytest.approx([0.0, 2 * DELTA[0] / n, 0.0], abs=1e-6)
    # tau_0, position 2 (state s_2, token 1, softmax [1/4, 1/2, 1/4]): 2 delta_0 / n * (e_1 - p)
    assert g[0, 1].tolist() == pytest.approx([2 * DELTA[0] / n * x for x in (-0.25, 0.5, -0.25)], abs=1e-6)
    # tau_1, position 1: 2 delta_1 / n * e_0; padding position: zero
    assert g[1, 0].tolist() == pytest.approx([2 * DELTA[1] / n, 0.0, 0.0], abs=1e-6)
    assert g[1, 1].tolist() == [0.0, 0.0, 0.0]
    # The value term is what makes the loss depend on the overall level of z_1: shifting z_1 by c shifts delta by c.
    assert g[:, 0].sum(dim=-1).tolist() == pytest.approx([2 * d / n for d in DELTA], abs=1e-6)
    # Contrast: with V(s_1) detached the shift direction gets no gradient at all.
    logits2 = b["logits"].clone().requires_grad_(True)
    _, parts = tbrm_residual(logits2, b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA)
    detached = parts["v0"].detach() + parts["log_ratio_sum"] - b["rewards"] / BETA
    detached.pow(2).mean().backward()
    assert logits2.grad[:, 0].sum(dim=-1).abs().max().item() < 1e-6
    assert not torch.allclose(logits2.grad[:, 0], g[:, 0])


def test_tbrm_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    ref = torch.log_softmax(torch.randn(3, 4, 5, dtype=torch.float64), -1).gather(-1, tokens[..., None])[
        ..., 0
    ]
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    ref_v0 = torch.randn(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: tbrm_loss(z, tokens, mask, ref, rewards, 0.7, ref_v0=ref_v0)[0], (logits,)
    )


def test_tbrm_zero_residual_at_constructed_optimum() -> None:
    """Single-step bandit: pi*(a) ∝ pi_ref(a) exp(r(a)/beta) and V(s_1) = log sum_a pi_ref(a) exp(r(a)/beta)
    is exactly the logits z = log pi_ref + r/beta. Every action's residual is zero there, and only there."""
    log_ref = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    r_of = torch.tensor([1.0, 0.0, 0.4], dtype=torch.float64)
    z = log_ref + r_of / BETA  # [3]
    tokens = torch.arange(3).unsqueeze(1)  # one trajectory per action, [3, 1]
    logits = z.expand(3, 1, 3).clone().requires_grad_(True)
    loss, m = tbrm_loss(logits, tokens, torch.ones(3, 1), log_ref[:, None], r_of, BETA)
    loss.backward()
    assert m["residual_abs_max"].item() < 1e-12
    assert logits.grad.abs().max().item() < 1e-12
    assert torch.softmax(z, -1).tolist() == pytest.approx(
        (torch.softmax(log_ref + r_of / BETA, -1)).tolist(), abs=1e-12
    )
    # Same policy but a different level of z (softmax unchanged): nonzero residual -> V(s_1) is pinned too.
    loss2, _ = tbrm_loss((z + 0.3).expand(3, 1, 3), tokens, torch.ones(3, 1), log_ref[:, None], r_of, BETA)
    assert loss2.item() == pytest.approx(0.09, rel=1e-9)


def test_tbrm_calibrated_is_zero_at_reference_with_zero_reward() -> None:
    torch.manual_seed(1)
    logits = 3 * torch.randn(4, 6, 11)
    tokens = torch.randint(0, 11, (4, 6))
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 3, 1, 4])[:, None]).long()
    ref_lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]  # pi = pi_ref
    ref_v0 = torch.logsumexp(logits[:, 0], -1)
    loss, m = tbrm_loss(logits, tokens, mask, ref_lp, torch.zeros(4), 0.002, ref_v0=ref_v0)
    assert loss.item() < 1e-10
    assert m["log_ratio_sum_mean"].abs().item() < 1e-5
    # Uncalibrated, the same point has residual V(s_1) (the logits' level), not zero.
    loss_u, m_u = tbrm_loss(logits, tokens, mask, ref_lp, torch.zeros(4), 0.002)
    assert m_u["residual_mean"].item() == pytest.approx(ref_v0.mean().item(), rel=1e-5)


def test_tbrm_masking_matches_trimmed_batch() -> None:
    """Padding (any logits, tokens, ref values) changes neither the loss nor the gradients of real positions."""
    torch.manual_seed(2)
    lengths = [5, 2, 3]
    b, t, v = 3, 7, 13
    logits = torch.randn(b, t, v)
    tokens = torch.randint(0, v, (b, t))
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # bool mask
    ref = torch.randn(b, t)
    rewards = torch.tensor([1.0, 0.0, 1.0])
    z1 = logits.clone().requires_grad_(True)
    loss1, _ = tbrm_loss(z1, tokens, mask, ref, rewards, 0.1)
    loss1.backward()

    garbage_logits = torch.where(mask[..., None], logits, torch.full_like(logits, 1e4))
    garbage_tokens = torch.where(mask, tokens, torch.full_like(tokens, -100))
    garbage_ref = torch.where(mask, ref, torch.full_like(ref, float("nan")))
    z2 = garbage_logits.clone().requires_grad_(True)
    loss2, _ = tbrm_loss(z2, garbage_tokens, mask.float(), garbage_ref, rewards, 0.1)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss1.item(), rel=1e-6)
    assert torch.allclose(z2.grad, z1.grad, atol=1e-6)
    assert z2.grad[~mask].abs().max().item() == 0.0

    # Trajectory by trajectory, the loss is the mean of the trimmed (unpadded) trajectories' squared residuals.
    per = []
    for i, n in enumerate(lengths):
        res, _ = tbrm_residual(logits[i : i + 1, :n], tokens[i : i + 1, :n], torch.ones(1, n), ref[i : i + 1, :n],
                               rewards[i : i + 1], 0.1)  # fmt: skip
        per.append(res.item() ** 2)
    assert loss1.item() == pytest.approx(sum(per) / 3, rel=1e-6)


def test_tbrm_bf16_logits_compute_in_fp32() -> None:
    torch.manual_seed(3)
    logits = (4 * torch.randn(2, 5, 50)).bfloat16()
    tokens = torch.randint(0, 50, (2, 5))
    mask = torch.ones(2, 5)
    ref = torch.full((2, 5), -4.0)
    loss_bf, _ = tbrm_loss(logits, tokens, mask, ref, torch.tensor([1.0, 0.0]), 0.002)
    loss_32, _ = tbrm_loss(logits.float(), tokens, mask, ref, torch.tensor([1.0, 0.0]), 0.002)
    assert loss_bf.dtype == torch.float32
    assert loss_bf.item() == loss_32.item()


def test_token_logprobs_matches_log_softmax() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 4, 9)
    tokens = torch.randint(0, 9, (3, 4))
    lp, v0 = token_logprobs(logits, tokens)
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0], atol=1e-6)
    assert torch.allclose(v0, torch.logsumexp(logits[:, 0], -1))


def test_shape_errors_name_the_problem() -> None:
    b = hand_batch()
    with pytest.raises(ValueError, match="ref_logprobs must be"):
        tbrm_loss(b["logits"], b["tokens"], b["mask"], b["ref_logprobs"][:, :1], b["rewards"], BETA)
    with pytest.raises(ValueError, match="rewards must be"):
        tbrm_loss(b["logits"], b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"][:1], BETA)
    with pytest.raises(ValueError, match="beta must be > 0"):
        tbrm_loss(b["logits"], b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], 0.0)
    with pytest.raises(ValueError, match="logits must be"):
        tbrm_loss(b["logits"][0], b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA)


# ----------------------------------------------------------------------------------------------------------- GRPO


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.5])
    groups = torch.tensor([7, 7, 3, 3, 9, 5, 5, 5])
    a = group_advantages(rewards, groups, eps=0.0)
    s = 1 / math.sqrt(2)  # group 7: mean 0.5, unbiased std sqrt(0.5)
    assert a[:2].tolist() == pytest.approx([0.5 / s, -0.5 / s])
    assert a[2:4].tolist() == [0.0, 0.0]  # equal rewards: no signal (0/0 guarded by eps below)
    assert a[4].item() == 0.0  # singleton group
    # group 5: rewards 1, 0, 0.5 -> mean 0.5, unbiased std 0.5
    assert a[5:].tolist() == pytest.approx([1.0, -1.0, 0.0])
    assert not torch.isnan(group_advantages(rewards, groups)).any()


def _logp(row: list[float], a: int) -> float:
    return row[a] - math.log(sum(math.exp(x) for x in row))


def grpo_hand_case() -> tuple[dict[str, torch.Tensor], list[list[float]], list[list[float]]]:
    """Two groups of two, two positions, vocab 2; the ratio of each token is chosen, then the behaviour
    log-prob set to log pi - log ratio. Group 0: rewards 1/0 -> A = +-1/sqrt(0.5)*0.5 = +-sqrt(0.5);
    group 1: rewards 1/1 -> A = 0."""
    rows = [
        [[0.3, -0.2], [1.0, 0.5]],
        [[0.0, 0.7], [-1.0, 2.0]],
        [[0.2, 0.2], [0.0, 1.0]],
        [[1.5, 0.0], [0.4, 0.1]],
    ]
    tokens = [[0, 1], [1, 0], [0, 0], [1, 1]]
    mask = [[1, 1], [1, 0], [1, 1], [1, 1]]
    ratios = [[1.5, 1.1], [0.5, 1.0], [1.3, 0.7], [0.9, 1.0]]
    logp = [[_logp(rows[i][h], tokens[i][h]) for h in range(2)] for i in range(4)]
    beh = [[logp[i][h] - math.log(ratios[i][h]) for h in range(2)] for i in range(4)]
    batch = {
        "logits": torch.tensor(rows, dtype=torch.float64),
        "tokens": torch.tensor(tokens),
        "mask": torch.tensor(mask),
        "behaviour_logprobs": torch.tensor(beh, dtype=torch.float64),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "group_ids": torch.tensor([0, 0, 1, 1]),
    }
    return batch, ratios, mask


def test_grpo_hand_computed_values() -> None:
    b, ratios, mask = grpo_hand_case()
    adv = [math.sqrt(0.5), -math.sqrt(0.5), 0.0, 0.0]
    # -min(rho A, clip(rho, 0.8, 1.2) A) per token:
    #   seq0 (A>0): rho 1.5 -> clipped 1.2 A;  rho 1.1 -> 1.1 A
    #   seq1 (A<0): rho 0.5 -> min(-0.5|A|, -0.8|A|) = -0.8|A| -> +0.8|A|;  position 2 is padding
    #   seq2, seq3: A = 0 -> 0
    s = math.sqrt(0.5)
    per_token = [[-1.2 * s, -1.1 * s], [0.8 * s, 0.0], [0.0, 0.0], [0.0, 0.0]]
    loss, m = grpo_loss(**b, clip_eps=0.2, adv_eps=0.0)
    assert loss.item() == pytest.approx(sum(map(sum, per_token)) / 7, rel=1e-6)  # 7 real tokens
    loss_seq, _ = grpo_loss(**b, clip_eps=0.2, adv_eps=0.0, aggregation="seq_mean_token_mean")
    assert loss_seq.item() == pytest.approx(((-1.2 * s - 1.1 * s) / 2 + 0.8 * s / 1) / 4, rel=1e-6)
    assert m["reward_mean"].item() == pytest.approx(0.75)
    assert m["advantage_abs_mean"].item() == pytest.approx(sum(map(abs, adv)) / 4, rel=1e-6)
    assert m["flat_group_frac"].item() == 0.5  # group 1 (rewards 1, 1) teaches nothing
    real = [ratios[i][h] for i in range(4) for h in range(2) if mask[i][h]]
    assert m["ratio_mean"].item() == pytest.approx(sum(real) / 7, rel=1e-6)
    assert m["clip_frac"].item() == pytest.approx(2 / 7)  # seq0 pos1 and seq1 pos1
    assert m["behaviour_kl"].item() == pytest.approx(sum(1 / r + math.log(r) - 1 for r in real) / 7, rel=1e-6)
    # clip-higher: upper bound 1.6 un-clips seq0's first token
    loss_hi, _ = grpo_loss(**b, clip_eps=0.2, clip_eps_high=0.6, adv_eps=0.0)
    assert loss_hi.item() == pytest.approx((-1.5 * s - 1.1 * s + 0.8 * s) / 7, rel=1e-6)


def test_grpo_gradient_only_through_unclipped_tokens() -> None:
    b, ratios, _ = grpo_hand_case()
    logits = b.pop("logits").clone().requires_grad_(True)
    loss, _ = grpo_loss(logits, **b, clip_eps=0.2, adv_eps=0.0)
    loss.backward()
    g = logits.grad
    s = math.sqrt(0.5)
    # seq0 pos2 is the only unclipped token with A != 0: d/dlogp (-rho A)/7 = -rho A / 7, times (e_a - p)
    p = torch.softmax(torch.tensor([1.0, 0.5], dtype=torch.float64), -1)
    expected = -1.1 * s / 7 * (torch.tensor([0.0, 1.0], dtype=torch.float64) - p)
    assert torch.allclose(g[0, 1], expected, atol=1e-9)
    g_other = g.clone()
    g_other[0, 1] = 0
    assert g_other.abs().max().item() < 1e-12  # clipped tokens, padding, zero-advantage groups: no gradient


def test_grpo_kl_penalty() -> None:
    b, _, mask = grpo_hand_case()
    logp, _ = token_logprobs(b["logits"], b["tokens"], b["mask"])
    ref = logp.detach() - 0.3  # log pi_ref - log pi = -0.3 everywhere
    loss0, _ = grpo_loss(**b, adv_eps=0.0)
    loss1, m = grpo_loss(**b, adv_eps=0.0, ref_logprobs=ref, kl_coef=0.5)
    k3 = math.exp(-0.3) + 0.3 - 1
    assert m["ref_kl"].item() == pytest.approx(k3, rel=1e-9)
    assert loss1.item() == pytest.approx(loss0.item() + 0.5 * k3, rel=1e-9)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logprobs"):
        grpo_loss(**b, kl_coef=0.5)


def test_grpo_on_policy_gradient_is_policy_gradient() -> None:
    """With pi = pi_behaviour (ratio 1, nothing clipped) and token_mean, the gradient is
    -(1/N) sum_i A_i sum_h grad log pi(a_h|s_h): REINFORCE with the group baseline."""
    torch.manual_seed(5)
    logits = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (4, 3))
    mask = torch.ones(4, 3)
    beh = token_logprobs(logits, tokens)[0].detach()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    gid = torch.tensor([0, 0, 1, 1])
    loss, m = grpo_loss(logits, tokens, mask, beh, rewards, gid)
    (g1,) = torch.autograd.grad(loss, logits)
    adv = group_advantages(rewards, gid).to(torch.float64)
    surrogate = -(adv[:, None] * token_logprobs(logits, tokens)[0]).sum() / 12
    (g2,) = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(g1, g2, atol=1e-12)
    assert m["clip_frac"].item() == 0.0


# ------------------------------------------------------------------------------------------------------ SFT, config


def test_sft_loss_is_masked_token_nll() -> None:
    b = hand_batch()
    loss, m = sft_loss(b["logits"], b["tokens"], b["mask"])
    assert loss.item() == pytest.approx(-(LN(1 / 3) + LN(1 / 2) + LN(4 / 6)) / 3, rel=1e-6)
    assert m["response_length_mean"].item() == 1.5


def test_compute_loss_dispatches_on_config() -> None:
    b = hand_batch()
    batch = LossBatch(
        tokens=b["tokens"], mask=b["mask"], rewards=b["rewards"], ref_logprobs=b["ref_logprobs"]
    )
    loss, _ = compute_loss(TbrmLossConfig(beta=BETA), b["logits"], batch)
    assert loss.item() == pytest.approx((DELTA[0] ** 2 + DELTA[1] ** 2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="needs batch.ref_v0"):
        compute_loss(TbrmLossConfig(beta=BETA, calibrated=True), b["logits"], batch)
    with pytest.raises(ValueError, match="needs batch.group_ids"):
        compute_loss(TbrmLossConfig(beta=BETA, centered=True), b["logits"], batch)
    batch.group_ids = torch.tensor([3, 3])
    centered, _ = compute_loss(TbrmLossConfig(beta=BETA, centered=True), b["logits"], batch)
    assert centered.item() == pytest.approx(((DELTA[1] - DELTA[0]) / 2) ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="needs batch.behaviour_logprobs"):
        compute_loss(GrpoLossConfig(), b["logits"], batch)
    sft, _ = compute_loss(SftLossConfig(), b["logits"], batch)
    assert sft.item() == pytest.approx(sft_loss(b["logits"], b["tokens"], b["mask"])[0].item())

    g, _, _ = grpo_hand_case()
    gbatch = LossBatch(tokens=g["tokens"], mask=g["mask"], rewards=g["rewards"],
                       behaviour_logprobs=g["behaviour_logprobs"], group_ids=g["group_ids"])  # fmt: skip
    via_config, _ = compute_loss(GrpoLossConfig(clip_eps=0.2, adv_eps=1e-6), g["logits"], gbatch)
    direct, _ = grpo_loss(**g, clip_eps=0.2)
    assert via_config.item() == pytest.approx(direct.item(), rel=1e-12)


def test_loss_config_union_validates() -> None:
    adapter = TypeAdapter(LossConfig)
    assert isinstance(adapter.validate_python({"kind": "tbrm", "beta": 0.01}), TbrmLossConfig)
    grpo = adapter.validate_json('{"kind": "grpo", "clip_eps": 0.3, "kl_coef": 0.01}')
    assert isinstance(grpo, GrpoLossConfig) and grpo.needs_ref_logprobs
    assert not GrpoLossConfig().needs_ref_logprobs
    assert TbrmLossConfig(calibrated=True).needs_ref_v0 and not TbrmLossConfig().needs_ref_v0
    assert TbrmLossConfig(centered=True).needs_groups and GrpoLossConfig().needs_groups
    assert not TbrmLossConfig().needs_groups and not SftLossConfig().needs_groups
    for bad in ({"kind": "tbrm", "beta": 0}, {"kind": "ppo"}, {"kind": "tbrm", "betta": 0.1},
                {"kind": "grpo", "aggregation": "sum"}):  # fmt: skip
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)
