"""`tbrm up`: the whole cluster as local processes on loopback, supervised, with a live dashboard and a report.

What it does, top to bottom (`run_cluster`):

1. Resolve the run config (`deploy/run_config.py`), create the run directory (`deploy/run_dir.py`), build the toy
   model if a service uses it (`deploy/prepare.py`), fill the caches a machine's first run would otherwise fill
   inside its budget (`deploy/first_run.py`: DeepSpeed's compiled comm op, vLLM's model inspection), pick ports (the
   documented defaults where free, else free ones; `run.ports = "free"`: OS-assigned ones; reserved against other
   launchers on the machine, `deploy/ports.py`) and a random bearer token (`TBRM_AUTH_TOKEN`, unless one is set).
2. Start the processes of `deploy/topology.local_plan` (the single source of truth for commands, ports and health)
   as the specs of `deploy/local_services.py` (environment, thread budget, health checks, restart policy), each
   gated on its health check by `deploy/supervisor.py`: redis-server (own dir in the run directory, AOF) and the
   reward service; as soon as Redis answers, the buffer API, the actors and the learner together (locally they need
   only Redis, which cuts the cold start: an actor's first batch is graded when the reward service is up, the learner
   waits for data anyway). Training prompts are loaded into the prompt queue as soon as Redis answers. Each process
   logs to `<run_dir>/logs/<name>.log`. A service that dies, during start-up or later, is restarted per
   `[run.restart]` (back-off, crash-loop limit).
3. Evaluate held-out greedy accuracy (`deploy/run_evals.py`) on actor 0 as soon as it is up (policy version 0 =
   `initial_accuracy`) in the background, without pausing the learner, then every `eval_interval_s`, and once more
   at the end on the learner's last weights.
4. Poll the cluster every `poll_interval_s` (dashboard + `metrics.jsonl`) until the learner finishes its steps,
   the time budget ends, a service crashes beyond its restart policy, or Ctrl-C / SIGTERM arrives.
5. Stop the learner, let the actors load its last push, run the final evaluation, stop everything in reverse
   start order (SIGTERM, grace, SIGKILL, per process group), write `summary.json` and the plots
   (`deploy/run_summary.py`, `deploy/report.py`).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from rich.console import Console

from common.files import torch_extensions_dir, toy_model_dir
from deploy import topology
from deploy.dashboard import Collector, Dashboard, Snapshot
from deploy.first_run import warm
from deploy.local_services import base_env, build_specs, redis_server_binary
from deploy.ports import PortReservations, pick_ports
from deploy.prepare import apply_thread_counts, ensure_model, load_prompts, load_queue
from deploy.report import make_plots
from deploy.run_config import RunSection, dump_toml, table_config
from deploy.run_dir import RunDir
from deploy.run_evals import RunEvals
from deploy.run_summary import RunState, build_summary, print_result, publish_results
from deploy.supervisor import ProcSpec, ServiceCrashed, Supervisor, port_is_listening
from deploy.tracking import ClusterTracker, child_env

log = logging.getLogger(__name__)


class Cluster:
    """One local cluster run: `Cluster(...).run()` returns the process exit status."""

    def __init__(
        self,
        run: RunSection,
        config: dict[str, Any],
        run_dir: RunDir,
        console: Console | None = None,
        dashboard: bool = True,
    ) -> None:
        self.run_cfg = run
        self.config = config
        self.rd = run_dir
        self.console = console or Console()
        self.show_dashboard = dashboard
        self.state = RunState()
        self.sup = Supervisor(run_dir.logs)
        self.token = os.environ.get(topology.ENV_AUTH_TOKEN) or secrets.token_urlsafe(32)
        self.port_locks = PortReservations()
        self._stop = threading.Event()
        self._signals = 0
        self._dash: Dashboard | None = None
        # Known once `_prepare` picked the ports and built the plan:
        self.ports: topology.Ports | None = None
        self.actor_urls: dict[str, str] = {}
        self.learner_url = ""
        self.tracker: ClusterTracker | None = None
        self.evals: RunEvals | None = None
        self.run_info: dict[str, Any] = {}
        self._data_loaded: Future[None] | None = None

    @property
    def redis_url(self) -> str:
        assert self.ports is not None, "the cluster has no ports before _prepare()"
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self.state.interrupted = True
        self._stop.set()
        if self._signals >= 3:  # the user insists: stop now, skipping the final evaluation
            raise KeyboardInterrupt

    # ---- setup ----
    def _prepare(self) -> list[ProcSpec]:
        """Ports, the resolved config in the run directory, the model, the trackers; the specs to start."""
        run, cfg = self.run_cfg, self.config
        self.ports = pick_ports(run.actors, self.port_locks, defaults=run.ports == "default")
        redis_bin = redis_server_binary()
        cfg["learner"].setdefault("run_dir", str(self.rd.path / "learner"))
        apply_thread_counts(run, cfg)
        cfg["learner"].setdefault("report_to", list(run.report_to))
        cfg["learner"].setdefault("tensorboard_dir", str(self.rd.tensorboard / "learner"))
        ensure_model(cfg, say=self.console.print)
        warm(Path(cfg["actor"].get("model_dir") or toy_model_dir()), torch_extensions_dir(), say=self.console.print)
        self.rd.write_config(dump_toml(cfg))
        self.tracker = ClusterTracker(run.report_to, self.rd.path, dump_toml(cfg))
        plan = topology.local_plan(
            run.actors, ports=self.ports, python=sys.executable, redis_server=redis_bin, redis_dir=str(self.rd.redis)
        )
        self.actor_urls = {p.name: str(p.url) for p in plan if p.service == "actor"}
        self.learner_url = next(str(p.url) for p in plan if p.service == "learner")
        actor0 = next(iter(self.actor_urls.values()))
        self.evals = RunEvals(run, cfg, self.ports, actor0, self.state, self.rd, self.tracker, self._message)
        env = {
            **base_env(self.token, child_env(run.report_to, self.rd.path), torch_extensions_dir()),
            **topology.shared_env("local", self.ports, run_config=str(self.rd.config_path)),
        }
        self.run_info = {
            "argv": sys.argv,
            "ports": self.ports.model_dump(),
            "processes": [p.model_dump() for p in plan],
            "redis_server": redis_bin,
            "config": str(self.rd.config_path),
            "started_at": time.time(),
        }
        self.rd.write_run_info(self.run_info)
        return build_specs(plan, self.run_cfg, env, self.rd.path, self.sup)

    def _load_data(self) -> None:
        """Training prompts into the queue (if this Redis has none yet: a resumed run keeps its queue); the
        held-out prompts in memory."""
        assert self.evals is not None
        run = self.run_cfg
        train, test = load_prompts(run)
        self.evals.test_prompts = test[: run.eval_size] if run.eval_size else test
        load_queue(run, self.config, self.redis_url, train=train)

    def _load_data_and_hold(self) -> None:
        assert self.evals is not None
        self._load_data()
        if not self.evals.one_call():  # v0 must wait for a multi-call initial eval (see deploy/run_evals.py)
            self.evals.hold_sampling(True)

    # ---- without the run loop (fault tests, scripts) ----
    def start_services(self) -> None:
        """Start every service (health-gated) and load the prompts; no evaluation, dashboard or budget."""
        specs = self._prepare()

        def on_healthy(name: str, took: float) -> None:
            if name == "redis":
                self._load_data()

        try:
            self.sup.start_all(specs, on_healthy=on_healthy)
        finally:
            self.run_info["pids"] = self.sup.pids()
            self.rd.write_run_info(self.run_info)

    # ---- the run ----
    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        except KeyboardInterrupt:
            self.state.interrupted = True
            self.state.stop_reason = "interrupted"
            return self._finish(final_eval=False)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.evals is not None:
                self.evals.close()
            self.port_locks.release()  # the services are stopped: their ports are free for the next run

    def _run(self) -> int:
        specs = self._prepare()
        assert self.tracker is not None and self.evals is not None
        self.console.print(f"run directory: {self.rd.path}")
        for line in self.tracker.how_to_open():
            self.console.print(line, highlight=False, soft_wrap=True)
        # The budget starts with the services: building the toy model on first use is setup, like pip install.
        started = self.state.t0 = time.monotonic()
        try:
            self._start(specs, self.evals)
        except ServiceCrashed as e:
            return self._crashed(e)
        self.console.print(f"cluster up in {time.monotonic() - started:.1f} s; training "
                           f"({self._budget_text()}); Ctrl-C stops")
        self.evals.start_initial()
        collector = Collector(self.redis_url, self.actor_urls, self.learner_url, table_config=table_config(self.config))
        try:
            with Dashboard(self.console, title=f"tbrm up — {self.rd.path.name}") as dash:
                self._dash = dash if self.show_dashboard else None
                return self._poll(collector, self.evals)
        finally:
            self._dash = None
            collector.close()

    def _start(self, specs: list[ProcSpec], evals: RunEvals) -> None:
        """Every service up and healthy (restarts per policy on the way), the prompts loaded; ServiceCrashed if a
        service crashed beyond its restart policy or missed its health deadline."""

        def on_healthy(name: str, took: float) -> None:
            self.console.print(f"  {name:<10} healthy after {took:5.1f} s")
            if name == "redis":  # prompts load while the actors and the learner start (not on their path)
                self._data_loaded = evals.pool.submit(self._load_data_and_hold)
            if name == "learner":
                self.state.learner_started = time.monotonic()
            if name == next(iter(self.actor_urls)):
                evals.start_initial()

        try:
            self.sup.start_all(specs, on_healthy=on_healthy, should_stop=self._stop.is_set)
            if self._data_loaded is not None:
                self._data_loaded.result()  # a dataset error surfaces here, before training is reported as started
        finally:
            self.run_info["pids"] = self.sup.pids()
            self.rd.write_run_info(self.run_info)

    def _poll(self, collector: Collector, evals: RunEvals) -> int:
        """The run loop: restarts, dashboard and metrics, budget, evaluations; then `_finish`."""
        assert self.tracker is not None
        while not self._stop.is_set():
            try:
                self.sup.check()
            except ServiceCrashed as e:
                if e.name.startswith("learner") and e.returncode == 0:
                    break
                return self._crashed(e)
            if self.sup.exited_ok("learner"):
                self.state.stop_reason = "learner_done"
                break
            snap = collector.collect()
            snap.wall_s = time.monotonic() - self.state.t0
            self._annotate(snap)
            self.state.last_snapshot = snap
            record = snap.record()
            self.rd.append_metrics(record)
            self.tracker.on_snapshot(record)
            if self._dash is not None:
                self._dash.show(snap, self._budget_text())
            if self._budget_spent(snap):
                break
            evals.maybe_start()
            self._stop.wait(self.run_cfg.poll_interval_s)
        if self._stop.is_set() and not self.state.stop_reason:
            self.state.stop_reason = "interrupted"
        return self._finish(final_eval=not self.state.interrupted or self._signals < 2, collector=collector)

    def _annotate(self, snap: Snapshot) -> None:
        snap.services = self.sup.status()
        if self.state.evals:
            snap.accuracy = self.state.evals[-1].accuracy
            snap.accuracy_version = self.state.evals[-1].policy_version
        if self.state.initial:
            snap.initial_accuracy = self.state.initial.accuracy
        if snap.learner_step is not None and snap.learner_step > self.state.last_step_seen:
            self.state.last_step_seen = snap.learner_step
            self.state.last_step_at = time.monotonic()

    def _budget_text(self) -> str:
        parts = []
        if self.run_cfg.minutes:
            parts.append(f"{self.run_cfg.minutes:g} min")
        if self.run_cfg.steps:
            parts.append(f"{self.run_cfg.steps} steps")
        return " / ".join(parts) or "no budget"

    def _budget_spent(self, snap: Snapshot) -> bool:
        run = self.run_cfg
        if run.minutes is not None and time.monotonic() - self.state.t0 >= run.minutes * 60:
            self.state.stop_reason = "minutes"
            return True
        if run.steps is not None and (snap.learner_step or 0) >= run.steps:
            self.state.stop_reason = "steps"
            return True
        return False

    def _crashed(self, e: ServiceCrashed) -> int:
        self.state.crashed = e
        self.state.stop_reason = f"crashed:{e.name}"
        self.console.print(f"[bold red]{e}[/]")
        if e.tail:
            self.console.print(f"[dim]--- last lines of {e.log_path} ---[/]")
            self.console.print(e.tail, markup=False, highlight=False)
            self.console.print("[dim]---[/]")
        return self._finish(final_eval=False)

    # ---- the end ----
    def _finish(self, final_eval: bool, collector: Collector | None = None) -> int:
        """Stop the learner, final sync and evaluation, stop everything, write the summary, plots and verdict."""
        st = self.state
        if final_eval and "learner" in self.sup.order:
            # The learner first: it saves a checkpoint and its last push reaches the actors before they stop.
            self._message("stopping the learner ...")
            self.sup.stop("learner")
            st.learner_started = st.learner_started or st.t0
        if self.evals is not None:
            self.evals.collect(wait_s=self.run_cfg.eval_timeout_s)
            if final_eval and self.actor_urls_alive():
                self.evals.final(collector, self.token)
        last = st.last_snapshot
        if collector is not None and self.actor_urls_alive():
            last = collector.collect()
            last.wall_s = time.monotonic() - st.t0
            self._annotate(last)
            self.rd.append_metrics({**last.record(), "final": True})
        self.console.print("stopping services ...")
        codes = self.sup.stop_all()
        ports = self.ports.model_dump().values() if self.ports is not None else []
        leftovers = [p for p in ports if p and port_is_listening(p)]
        if leftovers:
            self.console.print(f"[yellow]ports still listening after stop: {leftovers}[/]")
        summary = build_summary(st, self.run_cfg, self.config, self.rd, last)
        self.rd.write_summary(summary)
        publish_results(summary, self.rd, self.tracker, self.console)
        try:
            make_plots(self.rd)
        except Exception as e:  # noqa: BLE001 (plots are a convenience; the summary is already written)
            log.warning("plotting failed: %s", e)
        print_result(self.console, summary, codes, self.run_cfg.target_gain_points, self.rd)
        return st.exit_status()

    def _message(self, text: str) -> None:
        if self._dash is not None:
            self._dash.message(text)
        else:
            self.console.print(text, highlight=False)

    def actor_urls_alive(self) -> bool:
        return any(
            self.sup.procs.get(n) is not None and self.sup.procs[n].popen.poll() is None for n in self.actor_urls
        )


def run_cluster(
    run: RunSection, config: dict[str, Any], run_dir: RunDir, console: Console | None = None, dashboard: bool = True
) -> int:
    """Run one cluster to its budget; returns the exit status (0 ok, 1 a service crashed, 130 interrupted)."""
    return Cluster(run, config, run_dir, console, dashboard).run()
