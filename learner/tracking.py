"""Experiment tracking: TensorBoard event files by default, Weights & Biases and MLflow on request, all offline.

One setting chooses the trackers, `report_to` (a list of "tensorboard", "wandb", "mlflow"; [] = none besides the
JSONL files). Every backend receives the same calls:

    tracker = Tracker(["tensorboard"], run_dir, run_name="20261202-0100", config={...})  # events: run_dir/tensorboard
    tracker.log({"loss": 0.3, "lr": 1e-4}, step=7, prefix="train/")     # numbers only; others are skipped
    tracker.text("config", toml_text)
    tracker.summary({"final_accuracy": 0.7})
    tracker.close()

- **tensorboard**: event files in `tensorboard_dir` (default `<run_dir>/tensorboard`), written by
  `learner/tb_events.py` with the standard library only; the `tensorboard` package is only needed to view them
  (`tensorboard --logdir DIR`).
- **wandb**: `wandb.init(mode="offline")` unless `WANDB_MODE` says otherwise; files under `WANDB_DIR` (default
  the run directory); sync later with `wandb sync`. Project `WANDB_PROJECT` (default "tbrm"); the processes of one
  cluster run share a group.
- **mlflow**: a file store at `<run_dir>/mlruns` unless `MLFLOW_TRACKING_URI` is set (`mlflow ui
  --backend-store-uri ...`). Experiment `MLFLOW_EXPERIMENT_NAME` (default "tbrm").

wandb and mlflow are imported only when asked for and are not part of the default install: a missing package is a
`TrackingError` saying what to install. A tracker that fails at run time is logged and dropped; it never stops
training. `MetricsLog` is the learner's `metrics.jsonl` writer that also feeds the trackers, and `read_scalars`
reads TensorBoard event files back (tests, reports) without the `tensorboard` package.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from learner.tb_events import EventWriter, read_events

log = logging.getLogger(__name__)

TrackerName = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")
_INSTALL = {
    "wandb": 'pip install "tbrm[wandb]" (or pip install wandb)',
    "mlflow": 'pip install "tbrm[mlflow]" (or pip install mlflow-skinny)',
}


class TrackingError(RuntimeError):
    """A tracker named in `report_to` is unknown or its package is missing; the message says what to install."""


class _Backend(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def text(self, tag: str, text: str) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _import(name: str, module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackingError(f'report_to includes "{name}" but the {module} package is not installed: {_INSTALL[name]}') from e


def numbers(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric values of a flat record (bools and None skipped), keys prefixed."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            continue
        out[f"{prefix}{k}"] = float(v)
    return out


class _TensorBoard:
    def __init__(self, log_dir: Path, config: Mapping[str, Any]) -> None:
        self.writer = EventWriter(log_dir)
        if config:
            self.text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.writer.scalars(metrics, step)

    def text(self, tag: str, text: str) -> None:
        self.writer.text(tag, text)

    def summary(self, values: dict[str, Any]) -> None:
        self.text("summary", "```\n" + json.dumps(values, indent=2, sort_keys=True, default=str) + "\n```")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, wandb_dir: Path, run_name: str, group: str | None, config: Mapping[str, Any]) -> None:
        wandb = _import("wandb", "wandb")
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tbrm"), name=run_name, group=group, dir=str(wandb_dir),
            config=dict(config), mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def text(self, tag: str, text: str) -> None:
        self.run.summary[tag] = text

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in values.items() if isinstance(v, int | float | str | bool)})

    def close(self) -> None:
        self.run.finish()


def mlflow_uri(run_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else a file store in `<run_dir>/mlruns` (offline)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve() / "mlruns").as_uri()


class _Mlflow:
    def __init__(self, uri: str, run_name: str, config: Mapping[str, Any]) -> None:
        mlflow = _import("mlflow", "mlflow")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tbrm")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        for k, v in _flatten(config).items():
            self.client.log_param(self.run_id, k[:250], str(v)[:500])

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, v, step=step)

    def text(self, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.txt")

    def summary(self, values: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, dict(values), "summary.json")
        for k, v in numbers(values, "summary/").items():
            self.client.log_metric(self.run_id, k, v)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_report_to(report_to: Iterable[str]) -> list[str]:
    """The list without duplicates; TrackingError for an unknown name (before anything starts)."""
    names = list(dict.fromkeys(report_to))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackingError(f"unknown tracker(s) {unknown} in report_to; known: {', '.join(TRACKERS)}")
    return names


class Tracker:
    """Fans every call out to the chosen backends; a backend that raises at run time is logged and dropped."""

    def __init__(
        self,
        report_to: Iterable[str],
        run_dir: str | Path,
        run_name: str,
        config: Mapping[str, Any] | None = None,
        group: str | None = None,
        tensorboard_dir: str | Path | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir else self.run_dir / "tensorboard"
        self.backends: dict[str, _Backend] = {}
        config = config or {}
        for name in check_report_to(report_to):
            if name == "tensorboard":
                self.backends[name] = _TensorBoard(self.tensorboard_dir, config)
            elif name == "wandb":
                self.backends[name] = _Wandb(Path(os.environ.get("WANDB_DIR") or self.run_dir), run_name, group, config)
            else:
                self.backends[name] = _Mlflow(mlflow_uri(self.run_dir), run_name, config)

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001  (a tracker must never stop training)
                log.warning("tracker %s failed in %s and is dropped: %s: %s", name, method, type(e).__name__, e)
                self.backends.pop(name, None)

    def log(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        metrics = numbers(record, prefix)
        if metrics:
            self._each("log", metrics, int(step))

    def text(self, tag: str, text: str) -> None:
        self._each("text", tag, text)

    def summary(self, values: Mapping[str, Any]) -> None:
        self._each("summary", dict(values))

    def close(self) -> None:
        self._each("close")
        self.backends.clear()


class MetricsLog:
    """The learner's per-step log: one JSON line per step in `path` (line-buffered), and the same numbers to the
    trackers as `train/<key>` at that step."""

    def __init__(self, path: Path, tracker: Tracker | None = None) -> None:
        self.file = open(path, "a", buffering=1)  # closed by close()
        self.tracker = tracker

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record, step=int(record.get("step", 0)), prefix="train/")

    def close(self) -> None:
        self.file.close()
        if self.tracker is not None:
            self.tracker.close()


def open_metrics_log(run_dir: Path, settings: Any, file_name: str = "metrics.jsonl") -> MetricsLog:
    """`MetricsLog` for a learner: trackers from `settings.report_to`, events in `settings.tensorboard_dir`
    (default `<run_dir>/tensorboard`), the run named after the run directory."""
    report_to = list(getattr(settings, "report_to", ["tensorboard"]))
    tracker = None
    if report_to:
        config = settings.redacted() if hasattr(settings, "redacted") else {}
        name = os.environ.get("TBRM_RUN_NAME") or Path(run_dir).resolve().name
        tracker = Tracker(report_to, run_dir, run_name=f"{name}-learner", config=config, group=name,
                          tensorboard_dir=getattr(settings, "tensorboard_dir", None))  # fmt: skip
    return MetricsLog(Path(run_dir) / file_name, tracker)


# ---- reading event files back ----


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `log_dir` (recursively): {tag: [(step, value), ...]} in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        for step, tag, value in read_events(path):
            if isinstance(value, float):
                out.setdefault(tag, []).append((step, value))
    return out


def read_texts(log_dir: str | Path) -> dict[str, str]:
    """The text summaries (`Tracker.text`, `summary`) under `log_dir`: {tag: text} (the last one wins)."""
    out: dict[str, str] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        for _, tag, value in read_events(path):
            if isinstance(value, str):
                out[tag] = value
    return out
