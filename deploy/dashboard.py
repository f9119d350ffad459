"""Live view of a running cluster: polls the services' HTTP status endpoints and Redis (through `buffer.client`).

`collect(...)` gathers one `Snapshot` (learner step and metrics, each actor's policy version and tokens/s, buffer
size, inserts/samples/acks, version lag, held-out accuracy); the launcher appends every snapshot to the run's
`metrics.jsonl`. `Dashboard` shows it: a rich `Live` table on a terminal, one plain line per interval otherwise
(CI logs, `tbrm up > log`).

    python -m deploy.dashboard [--redis URL] [--actors URL,URL] [--interval S]   # watch a running cluster
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from learner.metrics import (
    BATCH_REWARD_MEAN,
    NEVER_TRAINED_FRAC,
    REUSE_RATIO,
    VERSION_LAG_MAX,
    VERSION_LAG_MEAN,
    replay_usage,
)

log = logging.getLogger(__name__)

@dataclass
class ActorView:
    actor_id: str
    url: str
    policy_version: int | None = None
    tokens_per_s: float = 0.0
    trajectories: int = 0
    state: str = "?"
    error: str | None = None


@dataclass
class Snapshot:
    """One poll of the whole cluster (flattened into metrics.jsonl by `record()`)."""

    wall_s: float
    learner_step: int | None = None
    learner_version: int | None = None
    learner_state: str | None = None
    learner_metrics: dict[str, float] = field(default_factory=dict)
    actors: list[ActorView] = field(default_factory=list)
    buffer: dict[str, Any] = field(default_factory=dict)
    prompts_queued: int | None = None
    accuracy: float | None = None
    accuracy_version: int | None = None
    initial_accuracy: float | None = None
    errors: list[str] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Supervisor view per process (`Supervisor.status()`): state, restarts, last exit status (launcher only)."""

    @property
    def restarts(self) -> dict[str, int]:
        return {n: int(s.get("restarts") or 0) for n, s in self.services.items()}

    @property
    def batch_reward_mean(self) -> float | None:
        """The learner's last batch reward (learner/metrics.py names every key read here)."""
        return self.learner_metrics.get(BATCH_REWARD_MEAN)

    @property
    def version_lag_mean(self) -> float | None:
        return self.learner_metrics.get(VERSION_LAG_MEAN)

    @property
    def replay_usage(self) -> dict[str, float]:
        """reuse_ratio, never_trained_frac, dropped_stale_frac of the buffer so far ({} before any insert)."""
        return replay_usage(self.buffer)

    @property
    def tokens_per_s(self) -> float:
        return sum(a.tokens_per_s for a in self.actors)

    def record(self) -> dict[str, Any]:
        """The flat JSON record written to metrics.jsonl."""
        usage = self.replay_usage
        rec: dict[str, Any] = {
            "t": time.time(),
            "wall_s": round(self.wall_s, 3),
            "learner_step": self.learner_step,
            "policy_version": self.learner_version,
            BATCH_REWARD_MEAN: self.batch_reward_mean,
            VERSION_LAG_MEAN: self.version_lag_mean,
            VERSION_LAG_MAX: self.learner_metrics.get(VERSION_LAG_MAX),
            "tokens_per_s": round(self.tokens_per_s, 1),
            REUSE_RATIO: usage.get(REUSE_RATIO),
            NEVER_TRAINED_FRAC: usage.get(NEVER_TRAINED_FRAC),
            "actor_versions": {a.actor_id: a.policy_version for a in self.actors},
            "actor_trajectories": {a.actor_id: a.trajectories for a in self.actors},
            "prompts_queued": self.prompts_queued,
            "accuracy": self.accuracy,
            "learner": self.learner_metrics,
        }
        if self.services:
            rec["restarts"] = self.restarts
        for k in ("size", "inserts", "samples", "acks", "leased", "dropped_stale", "removed"):
            if k in self.buffer:
                rec[f"buffer_{k}"] = self.buffer[k]
        return rec


class Collector:
    """Polls one cluster. Every source is optional and failures are recorded, never raised: the dashboard must
    keep running while a service restarts."""

    def __init__(
        self,
        redis_url: str,
        actor_urls: dict[str, str],
        learner_url: str | None = None,
        table_config: Any = None,
        queue_name: str = "train",
        timeout_s: float = 2.0,
    ) -> None:
        self.redis_url = redis_url
        self.actor_urls = actor_urls
        self.learner_url = learner_url
        self.table_config = table_config
        """The run's TableConfig (the table checks that every user shares it); None = the defaults."""
        self.queue_name = queue_name
        self.timeout_s = timeout_s
        self.t0 = time.monotonic()
        self._redis: Any = None
        self._http = httpx.Client(timeout=timeout_s)

    def _conn(self) -> Any:
        if self._redis is None:
            from buffer.client import connect

            self._redis = connect(self.redis_url)
        return self._redis

    def collect(self) -> Snapshot:
        snap = Snapshot(wall_s=time.monotonic() - self.t0)
        self._learner(snap)
        self._buffer(snap)
        for actor_id, url in self.actor_urls.items():
            snap.actors.append(self._actor(actor_id, url))
        return snap

    def _learner(self, snap: Snapshot) -> None:
        status: dict[str, Any] | None = None
        if self.learner_url:
            try:
                resp = self._http.get(f"{self.learner_url}/v1/status")
                if resp.status_code == 200:
                    status = resp.json()
            except (httpx.HTTPError, ValueError) as e:
                snap.errors.append(f"learner: {type(e).__name__}")
        if status is None:
            try:
                from buffer.client import LearnerStatusStore

                st = LearnerStatusStore(self._conn()).get()
                status = st.model_dump() if st else None
            except Exception as e:  # noqa: BLE001 (any Redis/import failure: show it, keep polling)
                snap.errors.append(f"learner status: {type(e).__name__}: {e}")
        if status:
            snap.learner_step = status.get("step")
            snap.learner_version = status.get("policy_version")
            snap.learner_state = status.get("state")
            metrics = status.get("metrics") or {}
            snap.learner_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

    def _buffer(self, snap: Snapshot) -> None:
        try:
            from buffer.client import PromptQueue, ReplayTable

            r = self._conn()
            snap.buffer = ReplayTable(r, self.table_config or _default_table_config()).stats().model_dump()
            snap.prompts_queued = PromptQueue(r, self.queue_name).size()
        except Exception as e:  # noqa: BLE001 (Redis down or restarting: show it, keep polling)
            snap.errors.append(f"buffer: {type(e).__name__}: {e}")

    def _actor(self, actor_id: str, url: str) -> ActorView:
        view = ActorView(actor_id, url)
        try:
            resp = self._http.get(f"{url}/v1/status")
            resp.raise_for_status()
            st = resp.json()
            view.policy_version = st.get("policy_version")
            view.tokens_per_s = float(st.get("tokens_per_s") or 0.0)
            view.trajectories = int(st.get("trajectories") or 0)
            view.state = str(st.get("state", "?"))
        except (httpx.HTTPError, ValueError) as e:
            view.error = type(e).__name__
            view.state = "unreachable"
        return view

    def close(self) -> None:
        self._http.close()
        if self._redis is not None:
            self._redis.close()


def _default_table_config() -> Any:
    from buffer.schema import TableConfig

    return TableConfig()


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def render(snap: Snapshot, title: str = "tbrm", budget: str = "") -> Panel:
    """The rich view of one snapshot."""
    head = Table.grid(padding=(0, 3))
    for _ in range(4):
        head.add_column()
    acc = _fmt(snap.accuracy)
    if snap.initial_accuracy is not None and snap.accuracy is not None:
        acc += f"  ({100 * (snap.accuracy - snap.initial_accuracy):+.1f} pts from {snap.initial_accuracy:.3f})"
    head.add_row(
        Text(f"wall {snap.wall_s:6.0f}s {budget}", style="bold"),
        f"learner step [bold]{snap.learner_step if snap.learner_step is not None else '-'}[/]",
        f"policy v[bold]{snap.learner_version if snap.learner_version is not None else '-'}[/]",
        f"state {snap.learner_state or '-'}",
    )
    head.add_row(
        f"held-out acc [bold green]{acc}[/]",
        f"batch reward [bold]{_fmt(snap.batch_reward_mean)}[/]",
        f"version lag {_fmt(snap.version_lag_mean, '.2f')}",
        f"tokens/s [bold]{snap.tokens_per_s:,.0f}[/]",
    )
    b = snap.buffer
    head.add_row(
        f"buffer size {b.get('size', '-')}",
        f"inserts {b.get('inserts', '-')}  samples {b.get('samples', '-')}",
        f"acks {b.get('acks', '-')}  leased {b.get('leased', '-')}",
        f"stale-dropped {b.get('dropped_stale', '-')}  queued prompts {snap.prompts_queued if snap.prompts_queued is not None else '-'}",
    )
    m, usage = snap.learner_metrics, snap.replay_usage
    head.add_row(
        f"reuse {_fmt(usage.get(REUSE_RATIO), '.2f')}",
        f"never trained {_fmt(usage.get(NEVER_TRAINED_FRAC), '.1%')}",
        f"data age {_fmt(m.get('age_s_mean'), '.1f')} s",
        f"guard skipped {_fmt(m.get('guard_skipped_steps'), '.0f')} responses {_fmt(m.get('guard_responses'), '.0f')}",
    )
    actors = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("actor", "policy version", "lag", "tokens/s", "trajectories", "state"):
        actors.add_column(col)
    for a in snap.actors:
        lag = (
            str(snap.learner_version - a.policy_version)
            if snap.learner_version is not None and a.policy_version is not None
            else "-"
        )
        actors.add_row(
            a.actor_id, str(a.policy_version if a.policy_version is not None else "-"), lag,
            f"{a.tokens_per_s:,.0f}", str(a.trajectories), a.state,
        )  # fmt: skip
    parts: list[Any] = [head, Text(""), actors]
    shown = {k: m[k] for k in ("loss", "residual_mean", "v0_mean", "grad_norm", "step_time_s") if k in m}
    if shown:
        parts.append(Text("  ".join(f"{k} {v:.4g}" for k, v in shown.items()), style="dim"))
    line = services_line(snap)
    if line:
        parts.append(Text(line, style="yellow"))
    if snap.errors:
        parts.append(Text("; ".join(snap.errors[:3]), style="yellow"))
    return Panel(Group(*parts), title=title, border_style="cyan")


def services_line(snap: Snapshot) -> str:
    """Restarted or not-running services, e.g. "restarts: actor-0 2 (last exit -9, running), redis 1 (...)";
    "" while every service runs on its first start."""
    shown = []
    for name, st in snap.services.items():
        n = int(st.get("restarts") or 0)
        if n or st.get("state") != "running":
            last = st.get("last_exit")
            exit_text = f"last exit {last}, " if last is not None else ""
            shown.append(f"{name} {n} ({exit_text}{st.get('state')})")
    return "restarts: " + ", ".join(shown) if shown else ""


def plain_line(snap: Snapshot) -> str:
    """One log line per interval (non-TTY output)."""
    versions = ",".join(
        f"{a.actor_id}=v{a.policy_version if a.policy_version is not None else '?'}" for a in snap.actors
    )
    acc = _fmt(snap.accuracy)
    return (
        f"[{snap.wall_s:6.0f}s] step={snap.learner_step if snap.learner_step is not None else '-'} "
        f"version={snap.learner_version if snap.learner_version is not None else '-'} actors[{versions}] "
        f"reward={_fmt(snap.batch_reward_mean)} acc={acc} buffer={snap.buffer.get('size', '-')} "
        f"lag={_fmt(snap.version_lag_mean, '.2f')} tok/s={snap.tokens_per_s:.0f}"
    ) + (f" {services_line(snap)}" if services_line(snap) else "")


class Dashboard:
    """Shows snapshots: rich Live on a TTY, else a plain line every `plain_every_s` seconds."""

    def __init__(self, console: Console | None = None, title: str = "tbrm up", plain_every_s: float = 10.0) -> None:
        self.console = console or Console()
        self.title = title
        self.live_mode = self.console.is_terminal
        self.plain_every_s = plain_every_s
        self._last_plain = -1e9
        self._live: Live | None = None

    def __enter__(self) -> Dashboard:
        if self.live_mode:
            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def show(self, snap: Snapshot, budget: str = "") -> None:
        if self._live is not None:
            self._live.update(render(snap, self.title, budget))
        elif snap.wall_s - self._last_plain >= self.plain_every_s:
            self._last_plain = snap.wall_s
            self.console.print(plain_line(snap), highlight=False, soft_wrap=True, markup=False)

    def message(self, text: str) -> None:
        """A line above the live view (or in the plain log)."""
        self.console.print(text, highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Watch a running tbrm cluster.")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--actors", default="http://127.0.0.1:8100", help="comma-separated actor base URLs")
    p.add_argument("--learner", default="http://127.0.0.1:8003")
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args(argv)
    urls = {f"actor-{i}": u.rstrip("/") for i, u in enumerate(args.actors.split(",")) if u}
    collector = Collector(args.redis, urls, args.learner)
    try:
        with Dashboard(title="tbrm") as dash:
            while True:
                dash.show(collector.collect())
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        collector.close()


if __name__ == "__main__":
    sys.exit(main())
