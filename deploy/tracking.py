"""What `tbrm up` hands to the experiment trackers, and how the user opens them.

The learner logs its per-step metrics itself (`learner/tracking.py`, events in `<run_dir>/tensorboard/learner`);
the launcher adds what only it knows, in `<run_dir>/tensorboard/cluster`: the held-out evaluations (`eval/*` at the
policy version they evaluated, i.e. the learner step that produced it), the cluster's polled metrics (`cluster/*`: actor tokens/s, buffer counters, version
lag, once per new learner step), the resolved config (text) and the run summary (text + `summary/*`). Both are
runs of one TensorBoard log directory, so `tensorboard --logdir <run_dir>/tensorboard` shows them side by side.
W&B and MLflow get the same calls when `[run] report_to` names them (offline by default: see learner/tracking.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from learner.tracking import Tracker, mlflow_uri

EVAL_KEYS = ("accuracy", "correct", "n", "no_answer", "policy_version", "seconds", "mean_response_tokens")
"""Numeric fields of an eval.jsonl record logged as `eval/<key>` (the rest are examples and labels)."""


def child_env(report_to: list[str], run_path: Path) -> dict[str, str]:
    """Environment for the services, so every process of one run writes to one W&B folder and one MLflow store."""
    env = {"TBRM_RUN_NAME": run_path.name}
    if "wandb" in report_to:
        env["WANDB_DIR"] = str(run_path)
    if "mlflow" in report_to:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri(run_path)
    return env


class ClusterTracker:
    """The launcher's tracker: evals, cluster metrics, config and summary of one `tbrm up` run."""

    def __init__(self, report_to: list[str], run_path: Path, config_text: str) -> None:
        self.report_to = list(report_to)
        self.run_path = run_path
        self.tracker = Tracker(
            self.report_to, run_path, run_name=f"{run_path.name}-cluster", group=run_path.name,
            tensorboard_dir=run_path / "tensorboard" / "cluster",
        )  # fmt: skip
        self.tracker.text("config", "```toml\n" + config_text + "```")
        self._last_step: int | None = None

    def on_eval(self, record: Mapping[str, Any]) -> None:
        """An eval.jsonl record, at the policy version it evaluated (the learner step that produced those weights;
        an evaluation finishes some steps later)."""
        step = record.get("policy_version")
        step = record.get("learner_step") if step is None else step
        self.tracker.log({k: record[k] for k in EVAL_KEYS if k in record}, step=int(step or 0), prefix="eval/")

    def on_snapshot(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl record of the dashboard; logged once per learner step (polls repeat steps)."""
        step = record.get("learner_step")
        if step is None or step == self._last_step:
            return
        self._last_step = step
        flat = {k: v for k, v in record.items() if k not in ("t", "learner_step", "learner")}
        self.tracker.log(flat, step=int(step), prefix="cluster/")

    def on_summary(self, summary: Mapping[str, Any]) -> None:
        self.tracker.log(summary, step=int(summary.get("learner_steps") or 0), prefix="summary/")
        self.tracker.summary(summary)

    def close(self) -> None:
        self.tracker.close()

    def how_to_open(self) -> list[str]:
        """One line per tracker: the command that shows this run."""
        lines = []
        if "tensorboard" in self.report_to:
            hint = "" if importlib.util.find_spec("tensorboard") else "  (viewer: pip install tensorboard)"
            lines.append(f"TensorBoard: tensorboard --logdir {self.run_path / 'tensorboard'}{hint}")
        if "wandb" in self.report_to:
            lines.append(f"W&B (offline unless WANDB_MODE=online): wandb sync {self.run_path / 'wandb'}/offline-run-*")
        if "mlflow" in self.report_to:
            lines.append(f"MLflow: mlflow ui --backend-store-uri {mlflow_uri(self.run_path)}")
        return lines
