"""The run directory: everything a `tbrm up` run leaves behind, in one folder a user can open.

Layout::

    <run_dir>/
      config.toml          the resolved run config (defaults + --config file + CLI overrides), what the services read
      run.json             how the run was started: command line, ports, pids, versions
      logs/<service>.log   stdout+stderr of every service (redis, reward, buffer, actor-0.., learner)
      metrics.jsonl        one JSON object per dashboard poll (learner step, versions, buffer, reward, tokens/s)
      eval.jsonl           one JSON object per held-out evaluation (step, policy_version, accuracy, ...)
      summary.json         the headline numbers (initial/final accuracy, steps, wall time, trajectories, version)
      plots/*.png          accuracy and reward vs step and vs wall time, version-lag histogram
      tensorboard/         TensorBoard event files: cluster/ (evals, cluster metrics, config, summary) and
                           learner/ (per-step metrics); `tensorboard --logdir <run_dir>/tensorboard`
      hf/latest/           the learner's last weights as a complete HF model folder (`tbrm export` makes others)
      learner/             the learner's run dir: checkpoints/, weights/policy-v*.safetensors, metrics.jsonl
      redis/               the run's own redis-server dir (AOF lives here)

Appends are line-buffered JSON so that a crashed run still leaves readable files.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Summary(BaseModel):
    """`summary.json`: the result of a run at a glance."""

    model_config = ConfigDict(extra="forbid")

    initial_accuracy: float | None = None
    """Greedy held-out accuracy of the starting weights (policy version 0)."""
    final_accuracy: float | None = None
    """Greedy held-out accuracy of the last weights the learner pushed."""
    accuracy_gain_points: float | None = None
    """100 * (final - initial)."""
    best_accuracy: float | None = None
    initial_by_kind: dict[str, list[int]] = Field(default_factory=dict)
    """[correct, problems] per kind of toy problem at the start (add, add carry, sub, sub borrow; empty for other
    data): which column step the policy lacks."""
    final_by_kind: dict[str, list[int]] = Field(default_factory=dict)
    """The same at the final evaluation."""
    learner_steps: int = 0
    wall_s: float = 0.0
    """Seconds from the first service start to the final evaluation."""
    train_wall_s: float = 0.0
    """Seconds from the learner's start to its last step (the training budget actually used)."""
    trajectories: int = 0
    """Trajectories inserted into the replay buffer."""
    policy_version: int = 0
    """Last policy version the learner published."""
    actor_versions: dict[str, int | None] = Field(default_factory=dict)
    """Policy version each actor served at the end."""
    buffer: dict[str, float] = Field(default_factory=dict)
    """Replay table counters at the end (size, inserts, samples, acks, leased, dropped_stale, ...)."""
    replay: dict[str, float] = Field(default_factory=dict)
    """How the buffer was used (deploy.report.replay_summary): reuse_ratio, never_trained_frac,
    dropped_stale_frac, version_lag_mean, age_s_mean, grad_clip_frac, guard_skipped_steps, guard_responses."""
    eval_points: int = 0
    exit_reason: str = ""
    """steps | minutes | interrupted | crashed:<service> | learner_done."""
    ok: bool = True
    """False when a service crashed or the run was interrupted."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The knobs that matter for comparing runs (actors, loss, sync, beta, lr, batch)."""


def default_run_dir(root: str | Path = "runs") -> Path:
    """A new folder under `root` named by UTC time (and a counter if two runs start in the same second)."""
    base = Path(root) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


class RunDir:
    """Creates the layout and appends records. Cheap to construct; safe to use from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.logs = self.path / "logs"
        self.plots = self.path / "plots"
        self.redis = self.path / "redis"
        for d in (self.path, self.logs, self.plots, self.redis):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path = self.path / "config.toml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.eval_path = self.path / "eval.jsonl"
        self.summary_path = self.path / "summary.json"
        self.run_info_path = self.path / "run.json"
        self.tensorboard = self.path / "tensorboard"
        self.hf = self.path / "hf"

    def log_path(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def write_config(self, toml_text: str) -> Path:
        self.config_path.write_text(toml_text)
        return self.config_path

    def write_run_info(self, info: dict[str, Any]) -> None:
        _atomic_write(self.run_info_path, json.dumps(info, indent=2, sort_keys=True, default=str))

    def append_metrics(self, record: dict[str, Any]) -> None:
        _append_jsonl(self.metrics_path, record)

    def append_eval(self, record: dict[str, Any]) -> None:
        _append_jsonl(self.eval_path, record)

    def write_summary(self, summary: Summary) -> None:
        _atomic_write(self.summary_path, summary.model_dump_json(indent=2))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def read_evals(self) -> list[dict[str, Any]]:
        return read_jsonl(self.eval_path)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", buffering=1) as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (the run was killed mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ---- HF model folders from a run's exported weights (`tbrm export`, end of `tbrm up`) ----


def weights_dir_of(run_path: Path) -> Path:
    """The exported weights of a run: `<run>/learner/weights` (a `tbrm up` run) or `<run>/weights` (a learner's
    own run directory, e.g. the compose checkpoints volume)."""
    for cand in (run_path / "learner" / "weights", run_path / "weights"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"{run_path} has no exported weights (neither learner/weights/ nor weights/)")


def base_model_of(run_path: Path) -> Path:
    """The learner's initial model (config, tokenizer) of a run: `[learner] model_path` of its config.toml, else
    the learner's default (the toy model)."""
    from learner.settings import default_model_dir  # light: pydantic only

    try:
        with (run_path / "config.toml").open("rb") as f:
            path = tomllib.load(f).get("learner", {}).get("model_path")
    except (OSError, tomllib.TOMLDecodeError):
        path = None
    return Path(path) if path else default_model_dir()


def export_hf(
    run_path: str | Path, version: int | None = None, base_model: str | Path | None = None, out: str | Path | None = None
) -> tuple[Path, int]:
    """Write exported `version` (default: the newest) of a run as an HF model folder; returns (folder, version).

    Default folder: `<run>/hf/latest` for the newest version, `<run>/hf/v<version:08d>` for an explicit one."""
    from learner.weights import exported_versions, write_hf_folder

    run_path = Path(run_path).resolve()
    versions = exported_versions(weights_dir_of(run_path))
    if not versions:
        raise FileNotFoundError(f"no policy-v*.safetensors in {weights_dir_of(run_path)}")
    chosen = max(versions) if version is None else version
    if chosen not in versions:
        raise FileNotFoundError(
            f"version {chosen} is not kept in {weights_dir_of(run_path)}; kept: {sorted(versions)} "
            "(the learner keeps the newest `keep_weights`)"
        )
    if out is None:
        out = run_path / "hf" / ("latest" if version is None else f"v{chosen:08d}")
    base = Path(base_model) if base_model is not None else base_model_of(run_path)
    return write_hf_folder(base, versions[chosen], Path(out), version=chosen), chosen
