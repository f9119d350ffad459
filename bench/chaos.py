"""Chaos run: a whole local cluster (`tbrm up`, configs/toy.toml) for N minutes while actors, the learner, the
reward service and Redis (AOF on) are SIGKILLed at random, seeded moments; the launcher restarts them
(deploy/supervisor.py `RestartPolicy`). At the end the books are audited (bench/chaos_audit.py) and the run exits
non-zero on any violation.

    python bench/chaos.py [--minutes 10] [--seed 0] [--kills 22] [--actors 1] [--appendfsync everysec]
    make chaos

The N minutes count from the first poll of the cluster (all services up, initial evaluation done). Kill plan:
`--kills` moments drawn uniformly (seeded) between `--warmup-s` after that and `--tail-s` before the budget ends,
each aimed at a service group (at least `--min-each` per group: actor, learner, reward, redis; the rest at
random). A kill waits (up to `--max-wait-s`) until its target runs and is healthy again, so every kill hits a live
service. Shorter leases than the toy defaults (table 30 s, prompt claims 60 s) and a
checkpoint every 20 steps let the books settle within the run.

Audit (the books from the run's Redis, reopened from its AOF after the run, and the learner's training log):
every inserted trajectory is stored, consumed, evicted or counted as dropped; with max_times_sampled = 1 no
trajectory is trained twice beyond the documented rollback windows; learner, published and actor versions never
go backwards or repeat; no lease or prompt claim is stranded; held-out accuracy rises; the planned kills
happened; the launcher did not give up (crash loop). Output: a kill log and the audit on stdout,
`bench/results/chaos.json`, the run directory under `runs/chaos-<time>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import chaos_audit as audit  # noqa: E402

GROUPS = ("actor", "learner", "reward", "redis")
TABLE_LEASE_S = 30.0
PROMPT_LEASE_S = 60.0


def plan_kills(seed: int, n: int, min_each: int, start: float, end: float, actors: int,
               extra_groups: tuple[str, ...] = GROUPS) -> list[dict[str, Any]]:
    """`n` kills at sorted uniform moments in [start, end], each group at least `min_each` times, the rest drawn
    from `extra_groups`."""
    rng = random.Random(seed)
    groups = [g for g in GROUPS for _ in range(min_each)]
    groups += [rng.choice(extra_groups) for _ in range(max(0, n - len(groups)))]
    rng.shuffle(groups)
    moments = sorted(rng.uniform(start, end) for _ in groups)
    return [{"at_s": round(t, 1), "group": g,
             "target": f"actor-{rng.randrange(actors)}" if g == "actor" else g} for t, g in zip(moments, groups,
                                                                                                 strict=True)]


class Chaos(threading.Thread):
    """Carries out the kill plan against a running `Cluster` and polls the published weights meanwhile."""

    def __init__(self, cluster: Any, plan: list[dict[str, Any]], max_wait_s: float = 240.0) -> None:
        super().__init__(name="chaos", daemon=True)
        self.max_wait_s = max_wait_s
        self.c = cluster
        self.plan = plan
        self.kills: list[dict[str, Any]] = []
        self.published: list[dict[str, Any]] = []
        self.done = threading.Event()

    def _running(self, name: str) -> int | None:
        """pid of `name` if it runs and is healthy (supervisor's view), else None."""
        sup = self.c.sup
        try:
            st = sup.status().get(name, {})
            m = sup.procs[name]
        except (KeyError, RuntimeError):  # dict changed size during a restart: ask again later
            return None
        return m.popen.pid if st.get("state") == "running" and m.popen.poll() is None else None

    def _poll_published(self, redis: Any) -> None:
        from buffer.client import WeightsStore

        try:
            w = WeightsStore(redis).latest()
        except Exception:  # noqa: BLE001  (Redis is down during its own kills)
            return
        if w is not None and (not self.published or self.published[-1]["version"] != w.version):
            self.published.append({"t": time.time(), "version": w.version, "sha256": w.sha256})

    def run(self) -> None:
        from buffer.client import connect

        # the cluster is up once the launcher's poll loop runs (after the initial evaluation)
        while self.c.state.last_snapshot is None:
            if self.done.wait(1.0):
                return
        redis = connect(f"redis://127.0.0.1:{self.c.ports.redis}/0", timeout_s=2.0)
        t0 = self.c.state.t0  # reset by ChaosCluster at that first poll
        pending = [dict(k, waited_s=0.0) for k in self.plan]
        while pending:
            k = min(pending, key=lambda x: x["at_s"])
            while time.monotonic() - t0 < k["at_s"]:
                self._poll_published(redis)
                if self.done.wait(0.5):
                    return
            pid = self._running(k["target"])
            if pid is None and k["waited_s"] < self.max_wait_s:
                # still restarting from an earlier kill: try again in 10 s, other kills go ahead meanwhile
                k["at_s"] += 10.0
                k["waited_s"] += 10.0
                continue
            pending.remove(k)
            self._kill(k, pid)
        while not self.done.wait(0.5):
            self._poll_published(redis)

    def _kill(self, k: dict[str, Any], pid: int | None) -> None:
        rec = {**k, "killed": pid is not None, "pid": pid, "t": time.time(),
               "wall_s": round(time.monotonic() - self.c.state.t0, 1)}
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
                self.c.sup.procs[k["target"]].popen.wait(10)  # gone before the next kill looks for it
            except ProcessLookupError:
                rec["killed"] = False
            except (KeyError, subprocess.TimeoutExpired) as e:
                rec["note"] = f"not seen exiting: {e!r}"
        snap = self.c.state.last_snapshot
        rec["learner_step"] = snap.learner_step if snap else None
        self.kills.append(rec)
        print(f"  [{rec['wall_s']:6.1f}s] SIGKILL {k['target']:<9} pid {pid} "
              f"(learner step {rec['learner_step']}){'' if rec['killed'] else ' -- not running, skipped'}",
              flush=True)


def chaos_config(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from deploy.run_config import resolve

    return resolve(None, {
        "run": {"minutes": args.minutes, "actors": args.actors, "eval_interval_s": 60.0,
                "restart": {"backoff_s": 1.0, "backoff_max_s": 10.0, "max_restarts": 5, "window_s": 60.0}},
        "table": {"lease_s": TABLE_LEASE_S, "sampler": {"kind": args.sampler}},
        "actor": {"prompt_lease_s": PROMPT_LEASE_S},
        "learner": {"checkpoint_interval_steps": 20},
    })


def reopen_redis(rd: Any, everysec: bool) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server on the run's AOF directory (the run stopped its own), on a free port."""
    from deploy.local_services import redis_server_binary
    from deploy.supervisor import free_port, redis_ping

    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
                             "--appendfsync", "everysec" if everysec else "always", "--save", "",
                             "--dir", str(rd.redis)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not redis_ping(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the run's Redis did not come back from its AOF")
        time.sleep(0.2)
    return proc, f"redis://127.0.0.1:{port}/0"


def redis_books(url: str, config: dict[str, Any]) -> dict[str, Any]:
    """Table stats, lease and claim expiries, and leased items without a lease, from the run's Redis."""
    from buffer.client import PromptQueue, ReplayTable, connect
    from deploy.run_config import table_config

    r = connect(url)
    try:
        table = ReplayTable(r, table_config(config))
        stats = table.stats().model_dump()
        k = table.keys
        leases = {x.decode(): float(t) for x, t in r.zrange(k.lease_exp, 0, -1, withscores=True)}
        lease_ids = {x.decode() for x in r.hkeys(k.leases)}
        orphans = sum(1 for v in r.hvals(k.lease_of) if v.decode() not in lease_ids)
        q = PromptQueue(r, config["actor"].get("prompt_queue", "train"))
        claims = {x.decode(): float(t) for x, t in r.zrange(q.keys.claim_exp, 0, -1, withscores=True)}
        now_s, now_us = r.time()
        return {"stats": stats, "leases": leases, "claims": claims, "orphans": orphans, "now": now_s + now_us / 1e6,
                "prompts": q.info()}
    finally:
        r.close()


def run_audit(args: argparse.Namespace, rd: Any, config: dict[str, Any], chaos: Chaos, rc: int) -> dict[str, Any]:
    from learner.checkpoints import TRAINING_LOG, read_training_log

    everysec = args.appendfsync == "everysec"
    proc, url = reopen_redis(rd, everysec)
    try:
        books = redis_books(url, config)
    finally:
        proc.terminate()
        proc.wait(30)
    records = read_training_log(rd.path / "learner" / TRAINING_LOG)
    redis_kills = [k["t"] for k in chaos.kills if k["killed"] and k["group"] == "redis"]
    trained, facts = audit.audit_trained_once(audit.replay_training_log(records), redis_kills, everysec)
    summary = json.loads(rd.summary_path.read_text()) if rd.summary_path.exists() else {}
    checks = [
        audit.audit_kills(chaos.kills, args.kills, args.min_each),
        audit.Check("launcher restarted every death (no crash loop)", rc == 0, f"tbrm up exit status {rc} "
                    f"({summary.get('exit_reason')})"),
        audit.audit_books(books["stats"]),
        trained,
        audit.audit_learner_versions(records),
        audit.audit_published(chaos.published, redis_kills, everysec),
        audit.audit_actor_versions(rd.read_metrics()),
        audit.audit_stranded(books["leases"], books["claims"], books["now"], TABLE_LEASE_S, PROMPT_LEASE_S,
                             books["orphans"]),
        audit.audit_accuracy(summary),
    ]
    return {"checks": checks, "facts": facts, "books": books, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=22, help="SIGKILLs in all")
    p.add_argument("--min-each", type=int, default=4, help="at least this many per group (actor/learner/reward/redis)")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--extra-groups", default="learner,reward,redis",
                   help="groups the kills beyond --min-each go to (an actor restarts in minutes on a loaded CPU)")
    p.add_argument("--warmup-s", type=float, default=20.0, help="no kill in the first seconds of the budget")
    p.add_argument("--tail-s", type=float, default=75.0, help="no kill in the last seconds of the budget")
    p.add_argument("--max-wait-s", type=float, default=240.0, help="longest wait for a target to be up again")
    p.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec")
    p.add_argument("--sampler", choices=("fifo", "uniform"), default="fifo",
                   help="the table's sampler (fifo, the default, keeps available items in a zset; uniform in a set)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    args = p.parse_args(argv)

    from rich.console import Console

    from deploy.run_dir import RunDir

    run, config = chaos_config(args)
    rd = RunDir(REPO / "runs" / time.strftime("chaos-%Y%m%d-%H%M%S"))
    plan = plan_kills(args.seed, args.kills, args.min_each, args.warmup_s, args.minutes * 60 - args.tail_s,
                      args.actors, tuple(args.extra_groups.split(",")))
    load_before = os.getloadavg()
    print(f"chaos run: {args.minutes:g} min, {len(plan)} planned SIGKILLs (seed {args.seed}), run dir {rd.path}, "
          f"load {load_before[0]:.2f}", flush=True)
    cluster = _cluster_class(args.appendfsync)(run, config, rd, Console(file=open(rd.path / "launcher.out", "w"),
                                                                        width=140), dashboard=False)
    chaos = Chaos(cluster, plan, args.max_wait_s)
    chaos.start()
    rc = cluster.run()
    chaos.done.set()
    chaos.join(10)
    result = run_audit(args, rd, config, chaos, rc)
    return report(args, rd, chaos, result, load_before)


def _random_ports(n_actors: int, reservations: Any = None, defaults: bool = True) -> Any:
    """Consecutive free ports at a random base below Linux's ephemeral range (32768+): on a shared machine another
    cluster may take a default port between the check and the bind, and an outgoing connection may take an
    ephemeral one while a slow actor starts; a restarted service must also get its own port back. A drop-in for
    `deploy.ports.pick_ports` (same arguments; `defaults` is ignored), holding the launcher's `reservations`."""
    from deploy import topology
    from deploy.supervisor import pick_port_range

    while True:
        base = pick_port_range(random.randrange(10000, 30000), 4 + n_actors, set())
        if reservations is None or all([reservations.reserve(p) for p in range(base, base + 4 + n_actors)]):
            return topology.Ports(redis=base, reward=base + 1, buffer=base + 2, learner=base + 3, actor_base=base + 4)


def _cluster_class(appendfsync: str) -> Any:
    """The launcher's Cluster, with Redis' appendfsync set for the run (the default topology uses everysec) and
    ports away from the defaults."""
    import deploy.launcher as launcher

    launcher.pick_ports = _random_ports

    class ChaosCluster(launcher.Cluster):
        _clock_started = False

        def _annotate(self, snap: Any) -> None:
            # The budget is time under chaos: it starts at the first poll, once the cluster is up and the initial
            # evaluation is done (start-up takes minutes on a loaded machine).
            if not self._clock_started:
                self._clock_started = True
                self.state.t0 = time.monotonic()
            super()._annotate(snap)

        def _prepare(self) -> list[Any]:
            specs = super()._prepare()
            for s in specs:
                if s.name == "redis" and "--appendfsync" in s.argv:
                    s.argv[s.argv.index("--appendfsync") + 1] = appendfsync
            return specs

    return ChaosCluster


def report(args: argparse.Namespace, rd: Any, chaos: Chaos, result: dict[str, Any], load_before: Any) -> int:
    load = os.getloadavg()
    print("\nkill log:")
    for k in chaos.kills:
        print(f"  {k['wall_s']:7.1f}s  {k['target']:<9} pid {k['pid']}  learner step {k['learner_step']}"
              f"{'' if k['killed'] else '  (skipped: not running)'}")
    print("\naudit:")
    for c in result["checks"]:
        print(f"  [{'ok' if c.ok else 'FAIL':>4}] {c.name}: {c.detail}")
    ok = all(c.ok for c in result["checks"])
    print(f"\n{'PASS' if ok else 'FAIL'}; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
          f"(before: {load_before[0]:.2f}); run dir {rd.path}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "ok": ok, "args": {k: str(v) for k, v in vars(args).items()}, "run_dir": str(rd.path),
        "kills": chaos.kills, "checks": [c.__dict__ for c in result["checks"]], "facts": result["facts"],
        "buffer": result["books"]["stats"], "prompts": result["books"]["prompts"], "summary": result["summary"],
        "published_versions": len(chaos.published), "loadavg_before": load_before, "loadavg_after": load,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }, indent=1, default=str))
    print(f"results: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
