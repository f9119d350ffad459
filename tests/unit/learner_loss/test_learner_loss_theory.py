"""Theory test for TBRM (arXiv 2505.15311, docs/loss.md) on a tabular tree-shaped token MDP.

The MDP: 3 tokens; token 2 is end-of-sequence, tokens 0/1 continue; at most 3 tokens. A state is the prefix of
continue tokens (7 states), each with its own row of logits (the "model" is a [7, 3] table), so the learned
policy can represent any autoregressive distribution exactly. Trajectories (15 of them) get an outcome reward.

Minimizing the TBRM loss — the project's real `learner.loss.tbrm_loss` — on trajectories drawn from a behaviour
policy different from both pi_ref and pi must give the KL-regularized optimum
    pi*(tau) ∝ pi_ref(tau) exp(r(tau) / beta)
(every residual can be zero, and zero residuals on a covering data set pin pi(tau) = pi*(tau) exactly). The test
checks total variation < 0.02, and that the test can fail: plausible wrong variants (no V(s_1), V(s_1) detached,
the log-ratio sum divided by the length) stay far from pi*.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import pytest
import torch

from learner.loss import tbrm_loss, tbrm_residual

N_ACTIONS = 3
EOS = 2
HORIZON = 3
BETA = 0.5
TV_TOL = 0.02


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: threads only add overhead, and the machine's 2 cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def enumerate_mdp() -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    """All trajectories (token tuples) and the index of every non-terminal state (a prefix of continue tokens)."""
    states: dict[tuple[int, ...], int] = {}
    for depth in range(HORIZON):
        for prefix in itertools.product((0, 1), repeat=depth):
            states[prefix] = len(states)
    trajs: list[tuple[int, ...]] = []
    for length in range(1, HORIZON + 1):
        for prefix in itertools.product((0, 1), repeat=length - 1):
            last = range(N_ACTIONS) if length == HORIZON else (EOS,)
            trajs += [(*prefix, a) for a in last]
    return trajs, states


TRAJS, STATES = enumerate_mdp()


def to_batch(trajs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [B, H], mask [B, H], state index [B, H] (padding: token -100, state 0, mask 0)."""
    b = len(trajs)
    tokens = torch.full((b, HORIZON), -100, dtype=torch.long)
    state = torch.zeros((b, HORIZON), dtype=torch.long)
    mask = torch.zeros((b, HORIZON), dtype=torch.bool)
    for i, tau in enumerate(trajs):
        for h, a in enumerate(tau):
            tokens[i, h] = a
            state[i, h] = STATES[tau[:h]]
            mask[i, h] = True
    return tokens, mask, state


def trajectory_logprobs(table: torch.Tensor) -> torch.Tensor:
    """log pi(tau) [15] of the autoregressive policy softmax(table[state]) — exact enumeration."""
    tokens, mask, state = to_batch(TRAJS)
    logp = torch.log_softmax(table, dim=-1)[state]  # [B, H, A]
    picked = logp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, H]
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=1)


def total_variation(logp: torch.Tensor, logq: torch.Tensor) -> float:
    return 0.5 * (logp.exp() - logq.exp()).abs().sum().item()


def make_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random-ish reference table [7, 3] and outcome rewards in [0, 1] per trajectory [15]."""
    g = torch.Generator().manual_seed(seed)
    ref_table = 1.5 * torch.randn(len(STATES), N_ACTIONS, generator=g, dtype=torch.float64)
    rewards = torch.rand(len(TRAJS), generator=g, dtype=torch.float64)
    return ref_table, rewards


def optimal_logprobs(ref_table: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """log pi*(tau) = log pi_ref(tau) + r/beta - log Z (closed form over the 15 trajectories)."""
    unnorm = trajectory_logprobs(ref_table) + rewards / BETA
    return unnorm - torch.logsumexp(unnorm, dim=0)


def sample(behaviour_table: torch.Tensor, n: int, seed: int) -> list[tuple[int, ...]]:
    """n trajectories from the autoregressive behaviour policy softmax(behaviour_table[state])."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(behaviour_table, dim=-1)
    out = []
    for _ in range(n):
        tau: tuple[int, ...] = ()
        while True:
            a = int(torch.multinomial(probs[STATES[tau]], 1, generator=g))
            tau = (*tau, a)
            if a == EOS or len(tau) == HORIZON:
                break
        out.append(tau)
    return out


LossFn = Callable[..., torch.Tensor]


def correct(logits, tokens, mask, ref_lp, rewards, ref_v0):
    return tbrm_loss(logits, tokens, mask, ref_lp, rewards, BETA)[0]


def correct_calibrated(logits, tokens, mask, ref_lp, rewards, ref_v0):
    return tbrm_loss(logits, tokens, mask, ref_lp, rewards, BETA, ref_v0=ref_v0)[0]


def correct_centered(logits, tokens, mask, ref_lp, rewards, ref_v0):
    return tbrm_loss(logits, tokens, mask, ref_lp, rewards, BETA, group_ids=torch.zeros(len(rewards), dtype=torch.long))[0]


def wrong_no_v(logits, tokens, mask, ref_lp, rewards, ref_v0):
    _, p = tbrm_residual(logits, tokens, mask, ref_lp, rewards, BETA)
    return (p["log_ratio_sum"] - rewards / BETA).pow(2).mean()


def wrong_detached_v(logits, tokens, mask, ref_lp, rewards, ref_v0):
    _, p = tbrm_residual(logits, tokens, mask, ref_lp, rewards, BETA)
    return (p["v0"].detach() + p["log_ratio_sum"] - rewards / BETA).pow(2).mean()


def wrong_length_normalized(logits, tokens, mask, ref_lp, rewards, ref_v0):
    _, p = tbrm_residual(logits, tokens, mask, ref_lp, rewards, BETA)
    return (p["v0"] + p["log_ratio_sum"] / p["length"] - rewards / BETA).pow(2).mean()


def fit(
    loss_fn: LossFn,
    ref_table: torch.Tensor,
    rewards: torch.Tensor,
    data: list[tuple[int, ...]],
    steps: int = 800,
) -> torch.Tensor:
    """Full-batch Adam on the tabular logits; returns the learned table."""
    tokens, mask, state = to_batch(data)
    index = {tau: i for i, tau in enumerate(TRAJS)}
    r = rewards[[index[tau] for tau in data]]  # [B]
    ref_lp_all = torch.log_softmax(ref_table, dim=-1)[state]  # [B, H, A]
    ref_lp = ref_lp_all.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, H]
    ref_lp = torch.where(mask, ref_lp, torch.full_like(ref_lp, float("nan")))  # padding must be ignored
    ref_v0 = torch.logsumexp(ref_table[0], dim=-1).expand(len(data))  # V_ref(s_1), the calibrated variant

    table = torch.zeros(len(STATES), N_ACTIONS, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([table], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-4)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = table[state]  # [B, H, A]
        loss = loss_fn(logits, tokens, mask, ref_lp, r, ref_v0)
        loss.backward()
        opt.step()
        sched.step()
    return table.detach()


def behaviour_tables(ref_table: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {
        "uniform": torch.zeros_like(ref_table),
        "skewed": 0.8 * torch.randn(ref_table.shape, generator=g, dtype=torch.float64) - 0.3 * ref_table,
    }


@pytest.mark.parametrize("behaviour", ["uniform", "skewed"])
@pytest.mark.parametrize(
    "loss_fn", [correct, correct_calibrated, correct_centered], ids=["tbrm", "tbrm_calibrated", "tbrm_centered"]
)
def test_tbrm_converges_to_kl_regularized_optimum(loss_fn: LossFn, behaviour: str) -> None:
    ref_table, rewards = make_problem(seed=0)
    beh = behaviour_tables(ref_table)[behaviour]
    data = sample(beh, n=800, seed=2)
    assert set(data) == set(TRAJS), "the behaviour data must cover every trajectory"
    target = optimal_logprobs(ref_table, rewards)
    # The problem is non-trivial: pi* is far from pi_ref, from the behaviour policy, and from the best trajectory.
    assert total_variation(target, trajectory_logprobs(ref_table)) > 0.15
    assert total_variation(target, trajectory_logprobs(beh)) > 0.15
    assert target.exp().max() < 0.6

    table = fit(loss_fn, ref_table, rewards, data)
    learned = trajectory_logprobs(table)
    tv = total_variation(learned, target)
    assert tv < TV_TOL, f"TV(pi, pi*) = {tv:.4f}"

    # At the fitted point the residuals are ~0 (the rarest trajectories of the skewed data converge last, so the
    # behaviour-weighted mean is checked) and V(s_1) is log Z, Z = E_{pi_ref}[exp(r/beta)] (the log-partition of pi*).
    tokens, mask, state = to_batch(TRAJS)
    ref_lp = (
        torch.log_softmax(ref_table, dim=-1)[state].gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    )
    v_ref = torch.logsumexp(ref_table[0], dim=-1)
    calibrated = loss_fn is correct_calibrated
    residual, parts = tbrm_residual(
        table[state],
        tokens,
        mask,
        ref_lp,
        rewards,
        BETA,
        ref_v0=v_ref.expand(len(TRAJS)) if calibrated else None,
    )
    weights = trajectory_logprobs(beh).exp()
    if loss_fn is correct_centered:
        # V(s_1) is solved per group (one group here: every trajectory starts in the same state): the residuals are
        # equal (zero variance), and the logits' own V(s_1) gets no gradient, so its level is arbitrary.
        mean = (weights * residual).sum()
        assert (weights * (residual - mean).pow(2)).sum().item() < 1e-2  # no V(s_1) fit: the rare ones lag more
        return
    assert (weights * residual.pow(2)).sum().item() < 1e-4
    log_z = torch.logsumexp(trajectory_logprobs(ref_table) + rewards / BETA, dim=0)
    v0_target = log_z + (
        v_ref if calibrated else 0.0
    )  # calibrated: V(s_1) - V_ref(s_1) plays the role of log Z
    assert abs(parts["v0"][0].item() - v0_target.item()) < 0.02


@pytest.mark.parametrize(
    "loss_fn",
    [wrong_no_v, wrong_detached_v, wrong_length_normalized],
    ids=["no_v", "detached_v", "length_normalized"],
)
def test_wrong_variants_miss_the_optimum(loss_fn: LossFn) -> None:
    ref_table, rewards = make_problem(seed=0)
    data = sample(behaviour_tables(ref_table)["uniform"], n=800, seed=2)
    table = fit(loss_fn, ref_table, rewards, data)
    tv = total_variation(trajectory_logprobs(table), optimal_logprobs(ref_table, rewards))
    # Far outside the tolerance the correct loss meets: the checker above would reject these variants.
    assert tv > 3 * TV_TOL, f"a wrong variant reached TV = {tv:.4f}"


def test_constructed_optimum_has_zero_residual_and_zero_gradient() -> None:
    """Backward induction gives the optimal table in closed form: z(s, a) = log pi_ref(a|s) + W(s a), where
    W(leaf) = r/beta and W(s) = logsumexp(z(s)). There every residual and the gradient of the loss vanish."""
    ref_table, rewards = make_problem(seed=3)
    log_ref = torch.log_softmax(ref_table, dim=-1)
    reward_of = dict(zip(TRAJS, rewards.tolist(), strict=True))
    table = torch.zeros_like(ref_table)
    for prefix, s in sorted(STATES.items(), key=lambda kv: -len(kv[0])):  # deepest states first
        for a in range(N_ACTIONS):
            child = (*prefix, a)
            if child in reward_of:
                w = reward_of[child] / BETA
            else:
                w = torch.logsumexp(table[STATES[child]], dim=-1).item()
            table[s, a] = log_ref[s, a] + w
    assert math.isclose(
        torch.logsumexp(table[0], dim=-1).item(),
        torch.logsumexp(trajectory_logprobs(ref_table) + rewards / BETA, dim=0).item(),
        rel_tol=1e-9,
    )
    tokens, mask, state = to_batch(TRAJS)
    ref_lp = log_ref[state].gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logits = table[state].clone().requires_grad_(True)
    loss, metrics = tbrm_loss(logits, tokens, mask, ref_lp, rewards, BETA)
    loss.backward()
    assert loss.item() < 1e-20
    assert metrics["residual_abs_max"].item() < 1e-9
    assert logits.grad.abs().max().item() < 1e-9
    assert total_variation(trajectory_logprobs(table), optimal_logprobs(ref_table, rewards)) < 1e-9
    # One step away from the optimum the loss is positive: the zero above is not vacuous.
    logits2 = table[state].clone()
    logits2[:, 1, 0] += 0.1
    assert tbrm_loss(logits2, tokens, mask, ref_lp, rewards, BETA)[0].item() > 1e-4
