"""One name per metric: the learner's metric keys that other readers use, their Prometheus names, and the replay
buffer's usage ratios.

The learner writes one line per step (`<run_dir>/metrics.jsonl`, `/v1/status` `metrics`, the Prometheus gauges of
`learner/app.py`). The dashboard (`deploy/dashboard.py`), the run's `metrics.jsonl` and `summary.json`
(`deploy/report.py`) and the Grafana dashboard (`deploy/grafana/dashboards/tbrm.json`) read those keys by the
names below, never by a list of guesses. A Prometheus gauge is named `tbrm_learner_<key>` with its unit spelled out
(`prometheus_name`). Light on purpose (no torch): the dashboard imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BATCH_REWARD_MEAN = "batch_reward_mean"
"""Mean reward of the step's batch (the loss's own `reward_mean` of the same trajectories is not repeated)."""
VERSION_LAG_MEAN = "version_lag_mean"
"""Mean learner version minus the trajectories' policy version over the batch."""
VERSION_LAG_MAX = "version_lag_max"
AGE_S_MEAN = "age_s_mean"
"""Mean seconds since the batch's trajectories were generated."""
GRAD_CLIPPED = "grad_clipped"
"""1 when the step's gradient norm exceeded `grad_clip`."""
REUSE_RATIO = "reuse_ratio"
"""Items handed to the learner per item inserted into the replay table (1.0 = each trained once)."""
NEVER_TRAINED_FRAC = "never_trained_frac"
"""Inserted trajectories never handed to the learner so far (left the table unsampled, or still waiting), over
inserts."""
DROPPED_STALE_FRAC = "dropped_stale_frac"
"""Inserted trajectories dropped as too stale, over inserts."""

LOSS_DUPLICATES = frozenset({"reward_mean"})
"""Loss outputs (learner/loss.py) the metrics line leaves out: the batch's `batch_reward_mean` already says it."""

# metric key in the learner's metrics line -> Prometheus help text (the gauge's name: `prometheus_name(key)`)
GAUGES: dict[str, str] = {
    "step": "Optimizer steps taken",
    "policy_version": "Current policy version (one per step)",
    "loss": "Loss of the last step",
    "residual_mean": "Mean TBRM residual delta(tau) of the last batch",
    "residual_std": "Std of the TBRM residuals of the last batch",
    "residual_abs_max": "Max |residual| of the last batch",
    "v0_mean": "Mean V(s_1) = logsumexp of the policy logits at the last prompt token",
    "log_ratio_sum_mean": "Mean summed log(pi/pi_ref) over the response",
    BATCH_REWARD_MEAN: "Mean reward of the last batch",
    "frac_correct": "Fraction of the last batch graded correct",
    VERSION_LAG_MEAN: "Mean learner_version - policy_version of the batch",
    VERSION_LAG_MAX: "Max learner_version - policy_version of the batch",
    "grad_norm": "Global gradient norm before clipping",
    "lr": "Learning rate of the last step",
    "step_time_s": "Wall time of the last step (sample to push)",
    "sample_time_s": "Time waiting for the batch",
    "ref_time_s": "Time of the reference forward (0 when cached)",
    "train_time_s": "Forward/backward/step time",
    "tokens_per_s": "Tokens processed per second of training compute",
    "push_latency_s": "Latency of the last successful weight push",
    "pushes_ok": "Successful weight pushes since start",
    "pushes_failed": "Failed weight pushes since start",
    "buffer_size": "Replay table size seen by the last sample",
    AGE_S_MEAN: "Mean seconds since the trained trajectories were generated",
    REUSE_RATIO: "Items sampled per item inserted in the replay table",
    NEVER_TRAINED_FRAC: "Inserted trajectories never sampled, over inserts",
    "residual_mean_correct": "Mean residual of rewarded trajectories",
    "residual_mean_incorrect": "Mean residual of unrewarded trajectories",
    "log_ratio_sum_mean_incorrect": "Mean summed log(pi/pi_ref) of unrewarded trajectories",
    "kl_snis": "Self-normalized IS estimate of KL(pi || pi_ref) on the batch",
    "flat_group_frac": "Fraction of the batch in groups whose rewards all agree (GRPO, centered TBRM: no signal)",
    GRAD_CLIPPED: "1 if the last step's gradient norm was clipped",
    "guard_skipped_steps": "Steps skipped for a non-finite loss or gradient",
    "guard_responses": "Stability-guard responses (rollback / lr back-off)",
}


def prometheus_name(key: str) -> str:
    """`tbrm_learner_<key>` with the unit spelled out: `step_time_s` -> `tbrm_learner_step_seconds`,
    `tokens_per_s` -> `..._tokens_per_second`, `age_s_mean` -> `..._age_seconds_mean`."""
    name = key.replace("_time_s", "_seconds").replace("_per_s", "_per_second").replace("_s_", "_seconds_")
    if name.endswith("_s"):
        name = name.removesuffix("_s") + "_seconds"
    return f"tbrm_learner_{name}"


def replay_usage(stats: Mapping[str, Any]) -> dict[str, float]:
    """How the replay table has been used so far, from its counters (`TableStats`, as a dict): `reuse_ratio`,
    `never_trained_frac`, `dropped_stale_frac`. Empty before the first insert; a ratio whose counter is missing is
    left out."""
    inserts = float(stats.get("inserts") or 0)
    if inserts <= 0:
        return {}
    out = {REUSE_RATIO: float(stats.get("samples") or 0) / inserts}
    if stats.get("sampled_distinct") is not None:
        out[NEVER_TRAINED_FRAC] = 1.0 - float(stats["sampled_distinct"]) / inserts
    if stats.get("dropped_stale") is not None:
        out[DROPPED_STALE_FRAC] = float(stats["dropped_stale"]) / inserts
    return out
