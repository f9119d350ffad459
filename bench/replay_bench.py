"""Replay study on the default toy run: reuse 1 / 2 / 4, fifo / uniform / |delta|-prioritized, GRPO as reference.

    python bench/replay_bench.py [--minutes 1.25] [--seeds 3] [--first-seed 0] [--target-gain 30]
                                 [--variants r1_fifo,...]
    make bench-replay

Every run is a full `tbrm up` (configs/toy.toml, own Redis, reward, buffer API, one actor, learner) with a short
time budget; only the replay settings differ between variants, and every variant runs with the same seeds
(learner and actor seeds = 0, 1, 2, ...), interleaved so that drifts of the shared machine's load hit all alike.
Reuse k means samples_per_insert = k and max_times_sampled = k (each trajectory trained on k times, the rate
limiter keeping the actors k times behind the learner's sample rate). For each run:

- time to +target: wall time from the initial held-out evaluation to the first evaluation at or above
  initial + target points (unreached: the budget, a lower bound);
- generated trajectories to +target: trajectories inserted by then (from the dashboard's buffer polls);
- final accuracy, learner steps, trajectories, reuse ratio and never-trained fraction (summary.json).

Results: a table on stdout and `bench/results/replay.json`.
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
sys.path.insert(0, str(REPO / "bench"))

from cluster_bench import launch, new_runs_root, selected_variants, time_to_target  # noqa: E402  (sibling)


def _reuse(k: int, sampler: dict[str, Any], max_staleness: int | None = None) -> dict[str, Any]:
    # error_buffer in sample units: 160 k keeps the actor up to ~160 trajectories ahead, as reuse 1 does.
    # max_staleness None (no drop) unless given: a replayed item is older by design.
    return {"table": {"sampler": sampler, "max_times_sampled": k, "max_staleness_versions": max_staleness,
                      "rate_limiter": {"samples_per_insert": float(k), "error_buffer": 160.0 * k}}}


FIFO, LIFO, UNIFORM = {"kind": "fifo"}, {"kind": "lifo"}, {"kind": "uniform"}
PRIO = {"kind": "prioritized", "exponent": 0.6}
VARIANTS: dict[str, dict[str, Any]] = {
    "r1_fifo_s8": _reuse(1, FIFO, max_staleness=8),  # the previous default: stale items dropped after 8 versions
    "r1_fifo": _reuse(1, FIFO),
    "r2_fifo": _reuse(2, FIFO),
    "r4_fifo": _reuse(4, FIFO),
    "r2_uniform": _reuse(2, UNIFORM),
    "r2_prio": _reuse(2, PRIO),
    "grpo_r1": {**_reuse(1, FIFO), "run": {"loss": "grpo"}},
    "r1_prio": _reuse(1, PRIO),
    # centered TBRM (docs/loss.md): V(s_1) solved per prompt group; run_config makes it 64 prompts x 4 samples
    "r1_centered": {**_reuse(1, FIFO), "learner": {"loss": {"centered": True}}},
    # lifo: a trajectory's second use comes a step or two after its first (fifo replays it after the backlog)
    "r2_lifo": _reuse(2, LIFO),
}
# Giving the learner 2 threads (to take the core that reuse leaves the actor idle) was measured and dropped: the
# two cores oversubscribed, 506 instead of 828 steps at reuse 1 and 671 instead of 1,072 at reuse 2 in 2 minutes.
OPT_IN = {"r1_prio", "r1_centered"}  # not in the default list (pass --variants)
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in OPT_IN]


def trajectories_at(metrics: list[dict[str, Any]], wall_s: float) -> float | None:
    """Trajectories inserted at `wall_s` (the last dashboard poll at or before it)."""
    seen = [m["buffer_inserts"] for m in metrics if m.get("wall_s", 1e18) <= wall_s and "buffer_inserts" in m]
    return float(seen[-1]) if seen else None


def load_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's records (evals, dashboard polls, summary) from its run directory."""
    from deploy.run_dir import RunDir

    rd = RunDir(run_dir)
    variant, _, seed = run_dir.name.rpartition("-s")
    return {"variant": variant, "seed": int(seed), "exit_code": None, "run_dir": str(run_dir),
            "evals": rd.read_evals(), "metrics": rd.read_metrics(), "summary": json.loads(rd.summary_path.read_text())}


def run_one(variant: str, seed: int, minutes: float, out_root: Path, eval_interval_s: float) -> dict[str, Any]:
    from deploy.run_config import deep_merge

    overrides = deep_merge(
        {"run": {"minutes": minutes, "eval_interval_s": eval_interval_s},
         "learner": {"seed": seed}, "actor": {"seed": seed}},
        VARIANTS[variant],
    )
    code, rd = launch(overrides, out_root / f"{variant}-s{seed}")
    summary = json.loads(rd.summary_path.read_text())
    return {"variant": variant, "seed": seed, "exit_code": code, "run_dir": str(rd.path),
            "evals": rd.read_evals(), "metrics": rd.read_metrics(), "summary": summary}


def score(r: dict[str, Any], gain: float) -> dict[str, Any]:
    ttt, init, best = time_to_target(r["evals"], gain)
    initial = next((e for e in r["evals"] if e.get("kind") == "initial"), None)
    trajs = None
    if ttt is not None and initial is not None:
        trajs = trajectories_at(r["metrics"], initial["wall_s"] + ttt)
    s = r["summary"]
    return {"variant": r["variant"], "seed": r["seed"], "exit_code": r["exit_code"], "run_dir": r["run_dir"],
            "time_to_target_s": ttt, "trajectories_to_target": trajs, "initial_accuracy": init, "best": best,
            "final_accuracy": s.get("final_accuracy"), "learner_steps": s.get("learner_steps"),
            "trajectories": s.get("trajectories"), "replay": s.get("replay", {})}


def _median(xs: list[float | None], bound: float | None) -> float | None:
    vals = [x if x is not None else bound for x in xs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(rows: list[dict[str, Any]], variants: list[str], budget_s: float) -> list[dict[str, Any]]:
    table = []
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        reached = [r for r in rs if r["time_to_target_s"] is not None]
        table.append({
            "variant": v, "runs": len(rs), "reached": len(reached),
            # unreached runs count as the whole budget (time) and are left out of the trajectory median
            "time_to_target_s_median": _median([r["time_to_target_s"] for r in rs], budget_s),
            "trajectories_to_target_median": _median([r["trajectories_to_target"] for r in reached], None),
            "final_accuracy_mean": statistics.mean(r["final_accuracy"] or 0 for r in rs),
            "gain_points_mean": statistics.mean(100 * ((r["final_accuracy"] or 0) - (r["initial_accuracy"] or 0))
                                                for r in rs),
            "learner_steps_mean": statistics.mean(r["learner_steps"] or 0 for r in rs),
            "trajectories_mean": statistics.mean(r["trajectories"] or 0 for r in rs),
            "reuse_ratio_mean": statistics.mean(r["replay"].get("reuse_ratio", 0) for r in rs),
            "never_trained_frac_mean": statistics.mean(r["replay"].get("never_trained_frac", 0) for r in rs),
        })
    ref = next((t for t in table if t["variant"] == "r1_fifo"), None)
    for t in table:
        for key in ("time_to_target_s_median", "trajectories_to_target_median"):
            a, b = t[key], ref[key] if ref else None
            t[key.replace("_median", "_vs_r1_fifo")] = (a / b) if a and b else None
    return table


def print_table(table: list[dict[str, Any]], gain: float, minutes: float, seeds: int) -> None:
    print(f"\nreplay study: +{gain:g} points of held-out greedy accuracy, {minutes:g}-minute budget, {seeds} seeds "
          "(median; unreached runs count as the full budget)")
    head = (f"{'variant':<11} {'reached':>7} {'time s':>7} {'x r1':>6} {'trajs':>7} {'x r1':>6} {'final':>6} "
            f"{'gain':>6} {'steps':>6} {'reuse':>6} {'unused':>7}")
    print(head)
    for t in table:
        def f(x: float | None, spec: str) -> str:
            return "-" if x is None else format(x, spec)

        print(f"{t['variant']:<11} {t['reached']:>4}/{t['runs']:<2} {f(t['time_to_target_s_median'], '.0f'):>7} "
              f"{f(t['time_to_target_s_vs_r1_fifo'], '.2f'):>6} {f(t['trajectories_to_target_median'], '.0f'):>7} "
              f"{f(t['trajectories_to_target_vs_r1_fifo'], '.2f'):>6} {t['final_accuracy_mean']:>6.3f} "
              f"{t['gain_points_mean']:>+6.1f} {t['learner_steps_mean']:>6.0f} {t['reuse_ratio_mean']:>6.2f} "
              f"{t['never_trained_frac_mean']:>7.1%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=1.25, help="budget of each run (launch to end of training)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed + seeds - 1 (add "
                   "seeds to an earlier study, then --rescore the runs together)")
    p.add_argument("--target-gain", type=float, default=30.0)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--eval-interval", type=float, default=10.0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "replay.json"))
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "bench-replay"))
    p.add_argument("--rescore", metavar="DIR", help="score the finished runs under DIR again (e.g. another "
                   "--target-gain) instead of running new ones")
    args = p.parse_args()
    if args.rescore:
        rows = [score(load_run(d), args.target_gain) for d in sorted(Path(args.rescore).iterdir()) if d.is_dir()]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        seeds = len({r["seed"] for r in rows})
        table = summarize(rows, variants, args.minutes * 60)
        print_table(table, args.target_gain, args.minutes, seeds)
        write_results(Path(args.out), args, variants, seeds, table, rows, loads=[])
        return 0
    variants = selected_variants(p, args.variants, VARIANTS)
    root = new_runs_root(args.runs_dir)
    rows, loads = [], []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for v in variants:
            print(f"[{time.strftime('%H:%M:%S')}] {v} seed {seed} ({args.minutes:g} min) ...", flush=True)
            r = score(run_one(v, seed, args.minutes, root, args.eval_interval), args.target_gain)
            loads.append(os.getloadavg()[0])
            print(f"    exit {r['exit_code']}: acc {r['initial_accuracy']} -> {r['final_accuracy']}, steps "
                  f"{r['learner_steps']}, to +{args.target_gain:g}: {r['time_to_target_s']} s / "
                  f"{r['trajectories_to_target']} trajectories, replay {r['replay']}", flush=True)
            rows.append(r)
    table = summarize(rows, variants, args.minutes * 60)
    print_table(table, args.target_gain, args.minutes, args.seeds)
    write_results(Path(args.out), args, variants, args.seeds, table, rows, loads)
    return 0


def write_results(out: Path, args: argparse.Namespace, variants: list[str], seeds: int, table: list[dict[str, Any]],
                  rows: list[dict[str, Any]], loads: list[float]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "replay study (toy, tbrm up)", "minutes": args.minutes, "seeds": seeds,
        "target_gain_points": args.target_gain, "variants": {v: VARIANTS.get(v) for v in variants},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1min_after_each_run": loads},
        "table": table, "runs": rows,
    }, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    raise SystemExit(main())
