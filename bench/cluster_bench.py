"""Time-to-accuracy of the whole cluster: TBRM async vs TBRM sync vs GRPO async, same budget, repeated.

    python bench/cluster_bench.py [--minutes 1.5] [--repeats 2] [--target-gain 25] [--variants tbrm_async,...]
    make bench-cluster

Each run is a full `tbrm up` (own Redis, reward, buffer API, actors, learner; configs/toy.toml) with a time
budget. Time-to-accuracy is the wall time from the initial evaluation (training start) to the first held-out
evaluation at or above `initial + target_gain` points; a run that never gets there counts as "not reached" and
its budget is used as a lower bound. Results: a table on stdout and `bench/results/cluster.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS: dict[str, dict[str, Any]] = {
    "tbrm_async": {"loss": "tbrm", "sync": False},
    "tbrm_sync": {"loss": "tbrm", "sync": True},
    "grpo_async": {"loss": "grpo", "sync": False},
}


def time_to_target(evals: list[dict[str, Any]], gain_points: float) -> tuple[float | None, float | None, float]:
    """(seconds from the initial eval to the first eval >= initial + gain, initial acc, best acc)."""
    initial = next((e for e in evals if e.get("kind") == "initial"), None)
    if initial is None:
        return None, None, 0.0
    target = initial["accuracy"] + gain_points / 100
    best = max(e["accuracy"] for e in evals)
    for e in evals:
        if e["wall_s"] >= initial["wall_s"] and e["accuracy"] >= target - 1e-9:
            return e["wall_s"] - initial["wall_s"], initial["accuracy"], best
    return None, initial["accuracy"], best


def launch(overrides: dict[str, Any], run_dir: Path) -> tuple[int, Any]:
    """One full `tbrm up` of configs/toy.toml with `overrides`, its console output in `launcher.out`;
    returns (exit code, RunDir). Shared with bench/replay_bench.py."""
    from rich.console import Console

    from deploy.launcher import run_cluster
    from deploy.run_config import resolve
    from deploy.run_dir import RunDir

    run, cfg = resolve(None, overrides)
    rd = RunDir(run_dir)
    console = Console(file=open(rd.path / "launcher.out", "w"), width=120)  # closed below
    try:
        return run_cluster(run, cfg, rd, console=console, dashboard=False), rd
    finally:
        console.file.close()


def selected_variants(p: argparse.ArgumentParser, arg: str, known: dict[str, Any]) -> list[str]:
    """The comma-separated variant names of `arg`, each checked against `known` (argparse error otherwise)."""
    variants = [v for v in arg.split(",") if v]
    unknown = [v for v in variants if v not in known]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(known)}")
    return variants


def new_runs_root(runs_dir: str) -> Path:
    root = Path(runs_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_one(variant: str, minutes: float, repeat: int, out_root: Path, eval_interval_s: float) -> dict[str, Any]:
    spec = VARIANTS[variant]
    t = time.monotonic()
    code, rd = launch(
        {"run": {"minutes": minutes, "loss": spec["loss"], "sync": spec["sync"], "eval_interval_s": eval_interval_s}},
        out_root / f"{variant}-{repeat}",
    )
    summary = json.loads(rd.summary_path.read_text())
    return {
        "variant": variant,
        "repeat": repeat,
        "exit_code": code,
        "run_dir": str(rd.path),
        "wall_s": time.monotonic() - t,
        "evals": rd.read_evals(),
        "summary": {k: summary.get(k) for k in ("initial_accuracy", "final_accuracy", "best_accuracy",
                                                 "learner_steps", "trajectories", "policy_version", "train_wall_s")},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=1.5, help="budget of each run (launch to end of training)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--target-gain", type=float, default=25.0, help="accuracy gain (points) that counts as reached")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--eval-interval", type=float, default=10.0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cluster.json"))
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "bench-cluster"))
    args = p.parse_args()
    variants = selected_variants(p, args.variants, VARIANTS)
    root = new_runs_root(args.runs_dir)

    runs = []
    # Interleave the variants (a, b, c, a, b, c): slow drifts of a shared machine's load hit all of them alike.
    for rep in range(args.repeats):
        for v in variants:
            print(f"[{time.strftime('%H:%M:%S')}] {v} repeat {rep + 1}/{args.repeats} ({args.minutes:g} min) ...",
                  flush=True)
            r = run_one(v, args.minutes, rep, root, args.eval_interval)
            ttt, init, best = time_to_target(r["evals"], args.target_gain)
            r.update(time_to_target_s=ttt, initial=init, best=best)
            print(f"    exit {r['exit_code']}: acc {init} -> {r['summary']['final_accuracy']} (best {best}), "
                  f"steps {r['summary']['learner_steps']}, time to +{args.target_gain:g} pts: "
                  f"{'not reached' if ttt is None else f'{ttt:.0f} s'}", flush=True)
            runs.append(r)

    budget_s = args.minutes * 60
    table = []
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        times = [r["time_to_target_s"] for r in rs]
        reached = [t for t in times if t is not None]
        # Not reached: the whole budget is a lower bound on the time (so the ratio below is conservative).
        bounded = [t if t is not None else budget_s for t in times]
        table.append({
            "variant": v,
            "runs": len(rs),
            "reached": len(reached),
            "time_to_target_s_median": statistics.median(bounded) if bounded else None,
            "time_to_target_s": times,
            "final_accuracy_mean": statistics.mean(r["summary"]["final_accuracy"] or 0 for r in rs),
            "initial_accuracy_mean": statistics.mean(r["initial"] or 0 for r in rs),
            "learner_steps_mean": statistics.mean(r["summary"]["learner_steps"] or 0 for r in rs),
            "trajectories_mean": statistics.mean(r["summary"]["trajectories"] or 0 for r in rs),
        })
    ref = next((row for row in table if row["variant"] == "tbrm_async"), table[0])
    for row in table:
        a, b = row["time_to_target_s_median"], ref["time_to_target_s_median"]
        row["time_ratio_vs_tbrm_async"] = (a / b) if a and b else None

    print(f"\ntime to +{args.target_gain:g} points of held-out greedy accuracy ({args.minutes:g}-minute budget, "
          f"{args.repeats} repeats, median; unreached runs count as the full budget)")
    print(f"{'variant':<12} {'reached':>8} {'median s':>9} {'x tbrm_async':>13} {'final acc':>10} {'steps':>7} "
          f"{'trajs':>7}")
    for row in table:
        ratio = row["time_ratio_vs_tbrm_async"]
        print(f"{row['variant']:<12} {row['reached']:>5}/{row['runs']:<2} {row['time_to_target_s_median']:>9.0f} "
              f"{('-' if ratio is None else f'{ratio:.2f}'):>13} {row['final_accuracy_mean']:>10.3f} "
              f"{row['learner_steps_mean']:>7.0f} {row['trajectories_mean']:>7.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "cluster time-to-accuracy",
        "minutes": args.minutes,
        "repeats": args.repeats,
        "target_gain_points": args.target_gain,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_end": os.getloadavg()},
        "table": table,
        "runs": [{k: v for k, v in r.items() if k != "evals"} | {"evals": [
            {k: e.get(k) for k in ("kind", "wall_s", "learner_step", "accuracy", "policy_version")} for e in r["evals"]
        ]} for r in runs],
    }, indent=2))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
