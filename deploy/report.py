"""Plots and the summary of a run directory (matplotlib Agg: works headless, no display needed).

    python -m deploy.report RUN_DIR      # (re)draw plots/ and print summary.json

Inputs are the run directory's `metrics.jsonl` (dashboard polls: learner step, batch reward, version lag), the
learner's own `learner/metrics.jsonl` (every step) and `eval.jsonl` (held-out evaluations); see
`deploy/run_dir.py`. Metric keys are the learner's (learner/metrics.py).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.run_dir import RunDir
from learner.metrics import AGE_S_MEAN, BATCH_REWARD_MEAN, GRAD_CLIPPED, VERSION_LAG_MEAN, replay_usage

log = logging.getLogger(__name__)


def _series(records: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get(x) is None or r.get(y) is None:
            continue
        xs.append(float(r[x]))
        ys.append(float(r[y]))
    return xs, ys


def version_lags(metrics: Sequence[dict[str, Any]]) -> list[float]:
    """Version lag (learner version - behaviour policy version) of trained batches, one value per learner step.

    The learner reports the mean version lag of each sampled batch in its status (`version_lag_mean`); the
    dashboard records it per poll, so keep one value per distinct learner step."""
    seen: dict[int, float] = {}
    for r in metrics:
        step, lag = r.get("learner_step"), r.get(VERSION_LAG_MEAN)
        if step is None or lag is None or step in seen:
            continue
        seen[int(step)] = float(lag)
    return list(seen.values())


def learner_lags(run: RunDir) -> list[float]:
    """Per-step mean version lag from the learner's own `learner/metrics.jsonl` (every step, not every poll)."""
    from deploy.run_dir import read_jsonl

    return [
        float(r[VERSION_LAG_MEAN])
        for r in read_jsonl(run.path / "learner" / "metrics.jsonl")
        if r.get(VERSION_LAG_MEAN) is not None
    ]


def replay_summary(run: RunDir, buffer: dict[str, Any]) -> dict[str, float]:
    """How the replay buffer was used over the run: reuse ratio (items handed to the learner per item inserted),
    the fraction of inserted trajectories never trained on (left the table unsampled, or still unsampled in it at
    the end), the mean age of trained data in versions and seconds, and the stability guard's figures.

    `buffer` is the final `TableStats` dump."""
    from deploy.run_dir import read_jsonl

    out = {k: round(v, 4) for k, v in replay_usage(buffer).items()}
    rows = read_jsonl(run.path / "learner" / "metrics.jsonl")
    for key, name in ((VERSION_LAG_MEAN, VERSION_LAG_MEAN), (AGE_S_MEAN, AGE_S_MEAN), (GRAD_CLIPPED, "grad_clip_frac")):
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        if vals:
            out[name] = round(sum(vals) / len(vals), 4)
    if rows:
        for key in ("guard_skipped_steps", "guard_responses"):
            out[key] = float(rows[-1].get(key) or 0)
    return out


def _rolling(ys: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= n:
            acc -= ys[i - n]
        out.append(acc / min(i + 1, n))
    return out


def _learner_rewards(run: RunDir, metrics: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]] | None:
    """(step, batch reward) for every learner step from `learner/metrics.jsonl` (the dashboard samples less)."""
    from deploy.run_dir import read_jsonl

    rows = read_jsonl(run.path / "learner" / "metrics.jsonl")
    pts = [(float(r["step"]), float(r[BATCH_REWARD_MEAN])) for r in rows
           if r.get("step") is not None and r.get(BATCH_REWARD_MEAN) is not None]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else None


def make_plots(run: RunDir) -> list[Path]:
    """Draw the run's PNGs; returns the files written (missing data gives fewer plots, never an error)."""
    import matplotlib  # heavy; only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, evals = run.read_metrics(), run.read_evals()
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = run.plots / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    for x, xlabel, suffix in (("learner_step", "learner step", "step"), ("wall_s", "wall time (s)", "time")):
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ex, ey = _series(evals, x, "accuracy")
        if ex:
            ax[0].plot(ex, ey, "o-", color="tab:blue", label="held-out greedy accuracy")
            ax[0].set_ylim(-0.02, 1.02)
            ax[0].legend(loc="lower right")
        ax[0].set_xlabel(xlabel)
        ax[0].set_ylabel("accuracy")
        ax[0].set_title(f"held-out accuracy vs {xlabel}")
        mx, my = _series(metrics, x, BATCH_REWARD_MEAN)
        per_step = _learner_rewards(run, metrics) if x == "learner_step" else None
        if per_step:
            mx, my = per_step
        if mx:
            ax[1].plot(mx, my, ".", color="tab:orange", alpha=0.3, markersize=3, label="train reward (batch mean)")
            ax[1].plot(mx, _rolling(my, 25), "-", color="tab:red", label="rolling mean (25)")
            ax[1].legend(loc="lower right")
        ax[1].set_xlabel(xlabel)
        ax[1].set_ylabel("reward")
        ax[1].set_title(f"train reward vs {xlabel}")
        save(fig, f"accuracy_reward_vs_{suffix}.png")

    lags = learner_lags(run) or version_lags(metrics)
    fig, ax = plt.subplots(figsize=(5, 4))
    if lags:
        bins = max(1, int(max(lags)) + 1)
        ax.hist(lags, bins=bins, range=(0, bins), color="tab:green", edgecolor="black")
    ax.set_xlabel("version lag of trained batch (learner version - policy version)")
    ax.set_ylabel("learner steps")
    ax.set_title("off-policyness (version lag)")
    save(fig, "version_lag_hist.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m deploy.report RUN_DIR", file=sys.stderr)
        return 2
    run = RunDir(args[0])
    for p in make_plots(run):
        print(p)
    if run.summary_path.exists():
        print(run.summary_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
