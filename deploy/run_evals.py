"""When `tbrm up` measures held-out accuracy, and on which weights (the measuring itself: deploy/evaluation.py).

- **initial**: in the background as soon as actor 0 answers, on policy version 0 (`initial_accuracy`); the learner's
  first push needs a trained step, i.e. the actors' first graded batch, so the eval's single engine call is queued on
  version 0 while the learner starts;
- **periodic**: every `run.eval_interval_s`, in the background, without pausing the learner, unless actor 0 still
  serves the version the last evaluation measured;
- **final**: after the learner stopped and every live actor serves its last published weights (`sync_actors`).

One `/v1/generate` call runs on one weights version (pushes land between engine calls), so a held-out set that fits
one call needs no pause. A larger one does: the learner's side of the replay table is paused for the eval
(`hold_sampling`; its current step and push finish, the next waits) and a series that still straddles a push is
retried. Every result goes to `<run_dir>/evals.jsonl`, the trackers and the console.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from deploy import topology
from deploy.dashboard import Collector
from deploy.evaluation import EvalResult, eval_via_actor
from deploy.run_config import RunSection, table_config
from deploy.run_dir import RunDir
from deploy.run_summary import RunState
from deploy.tracking import ClusterTracker

log = logging.getLogger(__name__)

EVAL_ATTEMPTS = 4
"""Tries of a multi-call evaluation whose weights changed mid-way, before it gives up."""


@dataclass
class RunEvals:
    """The held-out evaluations of one run, on one background worker (which also loads the prompts first)."""

    run: RunSection
    config: dict[str, Any]
    ports: topology.Ports
    actor_url: str
    """Actor 0: every evaluation of the run asks the same actor."""
    state: RunState
    rd: RunDir
    tracker: ClusterTracker
    message: Callable[[str], None]
    test_prompts: list[Any] = field(default_factory=list)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="eval"))
    future: Future[EvalResult | None] | None = None
    kind: str = "periodic"
    """Kind of the evaluation in flight: initial or periodic."""
    last_at: float = 0.0

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    def one_call(self) -> bool:
        """True when the held-out set fits in one `/v1/generate` call (no pause of the learner needed)."""
        from actor_service.schema import MAX_GENERATE_PROMPTS

        return len(self.test_prompts) <= MAX_GENERATE_PROMPTS

    def hold_sampling(self, hold: bool) -> None:
        """Pause (or resume) the learner's side of the replay table; actors keep generating and filling the
        buffer, only the optimizer steps wait."""
        from buffer.client import ReplayTable, connect
        from learner.acks import patient_redis

        # patient: a Redis restart (restart policy) must not leave the learner paused until the next evaluation
        r = patient_redis(connect(self.redis_url))
        try:
            table = ReplayTable(r, table_config(self.config))
            if hold:
                table.pause("sampling")
            else:
                table.resume("sampling")
        finally:
            r.close()

    def eval_now(self, hold: bool | None = None) -> EvalResult | None:
        """Greedy held-out accuracy on actor 0's current weights (`hold`: pause sampling meanwhile; default: when
        the set needs several calls); None if the weights kept changing."""
        from reward.client import RewardClient

        hold = not self.one_call() if hold is None else hold
        if hold:
            self.hold_sampling(True)
        try:
            reward_url = f"http://127.0.0.1:{self.ports.reward}"
            with RewardClient(reward_url, timeout_s=self.run.eval_timeout_s) as rc:
                for attempt in range(EVAL_ATTEMPTS):
                    try:
                        return eval_via_actor(
                            self.actor_url, rc, self.test_prompts,
                            max_tokens=self.run.eval_max_tokens, timeout_s=self.run.eval_timeout_s,
                        )  # fmt: skip
                    except RuntimeError as e:  # weights changed mid-eval: try again on the new version
                        log.info("evaluation attempt %d retried: %s", attempt + 1, e)
            log.warning("held-out evaluation gave up: the weights kept changing")
            return None
        finally:
            if hold:
                self.hold_sampling(False)

    def record(self, res: EvalResult, kind: str) -> None:
        """One result into the run state, `evals.jsonl`, the trackers and the console."""
        snap = self.state.last_snapshot
        step = snap.learner_step if snap and snap.learner_step is not None else 0
        if kind == "initial":
            self.state.initial = res
            step = 0
        self.state.evals.append(res)
        record = {
            "kind": kind,
            "wall_s": round(time.monotonic() - self.state.t0, 3),
            "learner_step": step,
            **res.model_dump(exclude={"examples"}),
            "examples": res.examples,
        }
        self.rd.append_eval(record)
        self.tracker.on_eval(record)
        msg = f"held-out accuracy {res.accuracy:.3f} ({res.correct}/{res.n}) at policy v{res.policy_version} [{kind}]"
        if self.state.initial and kind != "initial":
            msg += f", {100 * (res.accuracy - self.state.initial.accuracy):+.1f} points"
        self.message(msg)

    def start_initial(self) -> None:
        """The baseline evaluation in the background (after the prompt loading: one worker), once."""
        if self.future is None and self.state.initial is None:
            self.kind = "initial"
            self.future = self.pool.submit(self.eval_now)
            self.last_at = time.monotonic()

    def collect(self, wait_s: float | None = None) -> None:
        """Record the evaluation in flight if it finished (or within `wait_s`)."""
        f = self.future
        if f is None or (wait_s is None and not f.done()):
            return
        self.future = None
        try:
            res = f.result(timeout=wait_s)
            if res is not None:
                self.record(res, self.kind)
                if self.kind == "initial" and res.policy_version not in (0, None):
                    self.message(f"[yellow]initial eval ran on v{res.policy_version}, not v0[/]")
        except Exception as e:  # noqa: BLE001 (an eval failure is reported, it does not end the run)
            self.message(f"[yellow]{self.kind} evaluation failed: {type(e).__name__}: {e}[/]")
        self.kind = "periodic"

    def maybe_start(self) -> None:
        """Collect a finished evaluation; start the next one when `eval_interval_s` has passed and actor 0 serves
        weights the last evaluation did not measure (an evaluation takes engine time from generation: on a slow
        machine the learner's first push can come after the first interval)."""
        self.collect()
        now = time.monotonic()
        if self.future is None and now - self.last_at >= self.run.eval_interval_s and not self.measured():
            self.last_at = now
            self.future = self.pool.submit(self.eval_now)

    def measured(self) -> bool:
        """True when the last evaluation ran on the version actor 0 serves now (as of the last poll)."""
        snap = self.state.last_snapshot
        served = next((a.policy_version for a in snap.actors if a.url == self.actor_url), None) if snap else None
        return served is not None and bool(self.state.evals) and self.state.evals[-1].policy_version == served

    def final(self, collector: Collector | None, token: str) -> None:
        """After the learner stopped: the actors on its last weights, then the final evaluation."""
        sync_actors(collector, self.redis_url, token, self.run.final_sync_timeout_s, self.message)
        try:
            res = self.eval_now()
            if res is not None:
                self.record(res, "final")
        except Exception as e:  # noqa: BLE001 (report and go on to shut down)
            self.message(f"[yellow]final evaluation failed: {type(e).__name__}: {e}[/]")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def sync_actors(
    collector: Collector | None, redis_url: str, token: str, timeout_s: float, message: Callable[[str], None]
) -> None:
    """After the learner stopped: make every live actor serve the learner's last published weights.

    The learner pushes after every step and publishes its final export in Redis (`WeightsStore`); a push still in
    flight when it stopped may be lost, so after half of `timeout_s` the launcher pushes the published file itself
    (same endpoint, same token) to any actor that still lags."""
    if collector is None:
        return
    from actor_service.client import WeightPushError, push_weights
    from buffer.client import WeightsStore, connect

    r = connect(redis_url)
    try:
        latest = WeightsStore(r).latest()
    finally:
        r.close()
    if latest is None:
        return
    start = time.monotonic()
    pushed: set[str] = set()
    while True:
        snap = collector.collect()
        lagging = [a for a in snap.actors if a.policy_version is not None and a.policy_version < latest.version]
        if not lagging:
            return
        waited = time.monotonic() - start
        if waited > timeout_s:
            message(f"[yellow]actors {[a.actor_id for a in lagging]} did not load v{latest.version}[/]")
            return
        if waited > timeout_s / 2 and latest.path:
            for a in [a for a in lagging if a.actor_id not in pushed]:
                pushed.add(a.actor_id)
                try:
                    push_weights(a.url, latest.path, latest.version, token, timeout_s=30.0)
                    log.info("pushed v%d to %s at the end of the run", latest.version, a.actor_id)
                except (WeightPushError, OSError) as e:
                    log.warning("final push to %s failed: %s", a.actor_id, e)
        time.sleep(0.5)
