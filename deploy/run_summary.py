"""The end of a `tbrm up` run: what the launcher tracked (`RunState`) turned into `summary.json` (`Summary`, deploy/
run_dir.py), the trackers' summary, the HF export of the last weights and the verdict printed on the console."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from deploy.dashboard import Snapshot
from deploy.evaluation import EvalResult
from deploy.report import replay_summary
from deploy.run_config import RunSection
from deploy.run_dir import RunDir, Summary, export_hf
from deploy.supervisor import ServiceCrashed
from deploy.tracking import ClusterTracker

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the launcher tracks during a run (feeds the dashboard, the summary and the exit code)."""

    t0: float = field(default_factory=time.monotonic)
    learner_started: float | None = None
    evals: list[EvalResult] = field(default_factory=list)
    initial: EvalResult | None = None
    last_snapshot: Snapshot | None = None
    last_step_seen: int = 0
    last_step_at: float | None = None
    stop_reason: str = ""
    crashed: ServiceCrashed | None = None
    interrupted: bool = False

    def exit_status(self) -> int:
        """0 ok, 1 a service crashed, 130 interrupted."""
        if self.crashed is not None:
            return 1
        return 130 if self.interrupted else 0


def build_summary(st: RunState, run: RunSection, config: dict[str, Any], rd: RunDir, last: Snapshot | None) -> Summary:
    """`summary.json` of the run from its state and last snapshot."""
    final = next((e for e in reversed(st.evals) if e is not st.initial), None)
    init_acc = st.initial.accuracy if st.initial else None
    fin_acc = final.accuracy if final else None
    step = st.last_step_seen
    if last and last.learner_step is not None:
        step = max(step, last.learner_step)
    learner = config.get("learner", {})
    return Summary(
        initial_accuracy=init_acc,
        final_accuracy=fin_acc,
        accuracy_gain_points=None if init_acc is None or fin_acc is None else round(100 * (fin_acc - init_acc), 2),
        best_accuracy=max((e.accuracy for e in st.evals), default=None),
        initial_by_kind=st.initial.by_kind if st.initial else {},
        final_by_kind=final.by_kind if final else {},
        learner_steps=step,
        wall_s=round(time.monotonic() - st.t0, 2),
        train_wall_s=round((st.last_step_at or time.monotonic()) - (st.learner_started or st.t0), 2),
        trajectories=int(last.buffer.get("inserts", 0)) if last else 0,
        policy_version=int(last.learner_version or 0) if last else 0,
        actor_versions={a.actor_id: a.policy_version for a in last.actors} if last else {},
        buffer={k: v for k, v in (last.buffer if last else {}).items() if isinstance(v, int | float)},
        replay=replay_summary(rd, last.buffer if last else {}),
        eval_points=len(st.evals),
        exit_reason=st.stop_reason or "done",
        ok=st.crashed is None and not st.interrupted,
        config={
            "actors": run.actors,
            "sync": run.sync,
            "minutes": run.minutes,
            "steps": run.steps,
            "loss": learner.get("loss", {}),
            "lr": learner.get("lr"),
            "batch_size": learner.get("batch_size"),
        },
    )


def publish_results(summary: Summary, rd: RunDir, tracker: ClusterTracker | None, console: Console) -> None:
    """The summary to the trackers; the learner's last weights as the HF folder `hf/latest`."""
    if tracker is not None:
        tracker.on_summary(summary.model_dump(mode="json"))
        tracker.close()
    try:
        folder, version = export_hf(rd.path)
    except FileNotFoundError as e:  # no step was exported (crash at start, zero steps)
        log.info("no HF export: %s", e)
        return
    console.print(f"model (policy v{version}, an HF folder for transformers, vLLM and `tbrm eval`): {folder}",
                  highlight=False, soft_wrap=True)  # fmt: skip


def _tally(t: list[int] | None) -> str:
    """[correct, problems] as "correct/problems" ("-" when that evaluation has no such kind)."""
    return f"{t[0]}/{t[1]}" if t else "-"


def print_result(c: Console, s: Summary, codes: dict[str, int | None], target_gain_points: float, rd: RunDir) -> None:
    """The verdict: steps, accuracy gain against the target, odd exit statuses, where the results are."""
    c.print(f"\n[bold]run finished[/] ({s.exit_reason}) in {s.wall_s:.0f} s: {s.learner_steps} learner steps, "
            f"policy v{s.policy_version}, {s.trajectories} trajectories")
    if s.initial_accuracy is not None and s.final_accuracy is not None:
        gain = 100 * (s.final_accuracy - s.initial_accuracy)
        verdict = "[bold green]target reached[/]" if gain >= target_gain_points else "[bold yellow]below target[/]"
        c.print(
            f"held-out greedy accuracy: {s.initial_accuracy:.3f} -> {s.final_accuracy:.3f} "
            f"([bold]{gain:+.1f} points[/]; target +{target_gain_points:g}: {verdict})"
        )
        if s.final_by_kind:
            c.print("by kind (start -> end): " + ", ".join(
                f"{k} {_tally(s.initial_by_kind.get(k))} -> {_tally(v)}" for k, v in sorted(s.final_by_kind.items())))
    else:
        c.print("held-out accuracy: not measured (see logs)")
    bad = {n: rc for n, rc in codes.items() if rc not in (0, None, -signal.SIGTERM)}
    if bad:
        c.print(f"[dim]exit statuses: {bad}[/]")
    c.print(f"results: {rd.summary_path}  plots: {rd.plots}  logs: {rd.logs}")
