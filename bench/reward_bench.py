"""Reward service benchmark: grades/s and request latency at 1, 2, 4, 8 concurrent clients against the real
service (its own process, free port), next to math-verify called in-process on one core, in the same run.

    python bench/reward_bench.py [--duration-s 8] [--batch 16] [--workers 2] [--cache]   (make bench-reward)

The mix imitates what actors send: prompts with 4 sampled ~1.5 kB chain-of-thought responses each; answers
from toy arithmetic (integers, 45% of prompts) and fractions/decimals (15%) to MATH-style LaTeX with random
parameters (40%: radicals, pi, polynomials, intervals, sets, tuples, matrices, lines, complex numbers), about
45% right, 40% wrong, 7% without a final answer, 3% "final answer is" without a box, 5% with an intermediate
boxed result before the final box; 2% of responses are long chains of thought (20-60 kB). Every response is
unique and the service cache is off (unless --cache), so every item is really graded. Results: a rich table and
bench/results/reward.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reward.schema import GradeItem  # noqa: E402


def latex_problem(rng: random.Random) -> tuple[str, str, str]:
    """(gold, a right answer written differently, a wrong answer) with random parameters, so that answer
    strings rarely repeat across prompts (no flattering parse-cache hits); these need math-verify."""
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 30)
    k = rng.randrange(12)
    if k == 0:
        return rf"\frac{{{a}\sqrt{{2}}}}{{2}}", rf"\frac{{{a}}}{{\sqrt{{2}}}}", rf"{a}\sqrt{{2}}"
    if k == 1:
        return rf"{a}\pi", rf"\pi \cdot {a}", rf"{a + 1}\pi"
    if k == 2:
        return f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2", f"(x+{a})^3"
    if k == 3:
        return f"({a},{a + b}]", rf"\left({a}, {a + b}\right]", f"[{a},{a + b}]"
    if k == 4:
        return rf"\{{{a},{a + b},{a + b + c}\}}", rf"\{{{a + b + c},{a},{a + b}\}}", rf"\{{{a},{a + b}\}}"
    if k == 5:
        return rf"({a},\frac{{\pi}}{{{b}}})", rf"\left({a}, \frac{{\pi}}{{{b}}}\right)", rf"({a},\pi)"
    if k == 6:
        return (rf"\begin{{pmatrix}}{a}\\{b}\end{{pmatrix}}", rf"\begin{{pmatrix}} {a} \\ {b} \end{{pmatrix}}",
                rf"\begin{{pmatrix}}{b}\\{a + 1}\end{{pmatrix}}")
    if k == 7:
        return rf"{a}\sqrt{{2}}", rf"\sqrt{{{2 * a * a}}}", rf"\sqrt{{{2 * a * a + 1}}}"
    if k == 8:
        return f"y={a}x+{b}", f"y = {b} + {a}x", f"y={a}x-{b}"
    if k == 9:
        return (rf"(-\infty,{a})\cup({a + b},\infty)", rf"(-\infty, {a}) \cup ({a + b}, \infty)",
                rf"(-\infty,{a + b})")
    if k == 10:
        return f"{a}+{b}i", f"{b}i+{a}", f"{a}-{b}i"
    return rf"\frac{{\pi}}{{{a}}}", rf"\dfrac{{\pi}}{{{a}}}", rf"\frac{{\pi}}{{{a + 1}}}"


FILLER = ("Let us reason step by step. We first rewrite the expression, then simplify each term carefully, "
          "checking the arithmetic at every stage so that no sign error slips in. ")


def make_mix(n: int, seed: int = 0, samples_per_prompt: int = 4) -> list[GradeItem]:
    """`n` items: prompts with `samples_per_prompt` sampled responses each (the gold repeats within a group)."""
    rng = random.Random(seed)
    items: list[GradeItem] = []
    while len(items) < n:
        kind = rng.random()
        if kind < 0.45:  # toy arithmetic: integers
            x, y = rng.randint(10, 99), rng.randint(10, 99)
            gold, right, wrong = str(x + y), str(x + y), str(x + y + rng.choice([-10, -1, 1, 10]))
        elif kind < 0.60:  # fractions / decimals
            p, q = rng.randint(1, 9), rng.choice([2, 4, 5, 8])
            gold, right, wrong = f"\\frac{{{p}}}{{{q}}}", str(p / q), str(round(p / q + 0.1, 3))
        else:  # MATH-style LaTeX: needs math-verify
            gold, right, wrong = latex_problem(rng)
        for _ in range(samples_per_prompt):
            i = len(items)
            text = f"Sample {i}. " + FILLER * rng.randint(6, 14)
            if rng.random() < 0.02:  # a reasoning model's long chain of thought (the grader reads its tail)
                text = f"Sample {i}. " + FILLER * rng.randint(120, 400)
            r = rng.random()
            if r < 0.45:
                resp = f"{text}Putting it together, the answer is $\\boxed{{{right}}}$."
            elif r < 0.85:
                resp = f"{text}Putting it together, the answer is $\\boxed{{{wrong}}}$."
            elif r < 0.92:  # truncated generation: no final answer
                resp = text + "Hence we need to compute"
            elif r < 0.95:  # final-answer phrase, no box
                resp = f"{text}\nThe final answer is ${right if r < 0.935 else wrong}$."
            else:  # an intermediate result boxed before the final one
                resp = (f"{text}First, $a = \\boxed{{{rng.randint(2, 9)}}}$. Then the answer is "
                        f"$\\boxed{{{right if r < 0.975 else wrong}}}$.")
            items.append(GradeItem(response=resp, gold=gold))
    return items[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_math_verify(items: list[GradeItem], budget_s: float) -> dict:
    """math-verify as a user would call it: parse(gold), parse(response), verify(gold, pred), one core."""
    from latex2sympy2_extended import latex2sympy2 as l2s
    from math_verify import parse, verify

    # The stock library: our two-stage (SLL-first) parser patch must not be active in this process.
    assert not getattr(l2s._Latex2Sympy, "_tbrm_two_stage", False), "baseline must run before our pipeline"
    n, lat = 0, []
    t_end = time.perf_counter() + budget_s
    t0 = time.perf_counter()
    for it in items:
        t = time.perf_counter()
        verify(parse(f"${it.gold}$"), parse(it.response))
        lat.append(time.perf_counter() - t)
        n += 1
        if time.perf_counter() > t_end:
            break
    wall = time.perf_counter() - t0
    return {"grades": n, "wall_s": wall, "grades_per_s": n / wall, **_pcts(lat)}


def baseline_ours_in_process(items: list[GradeItem], budget_s: float) -> dict:
    """Our pipeline (extraction + fast path + math-verify) in this process, one core, no service."""
    from reward.grading import grade_in_process

    n, lat = 0, []
    t_end = time.perf_counter() + budget_s
    t0 = time.perf_counter()
    for it in items:
        t = time.perf_counter()
        grade_in_process(it.response, it.gold)
        lat.append(time.perf_counter() - t)
        n += 1
        if time.perf_counter() > t_end:
            break
    wall = time.perf_counter() - t0
    return {"grades": n, "wall_s": wall, "grades_per_s": n / wall, **_pcts(lat)}


def _pcts(lat: list[float]) -> dict:
    lat = sorted(lat)
    if not lat:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


async def run_clients(url: str, items: list[GradeItem], clients: int, batch: int, duration_s: float) -> dict:
    lat: list[float] = []
    statuses: dict[str, int] = {}
    cursor = 0
    graded = 0

    async def client_loop(ac: httpx.AsyncClient, stop_at: float) -> None:
        nonlocal cursor, graded
        while time.perf_counter() < stop_at:
            chunk = [items[(cursor + j) % len(items)] for j in range(batch)]
            cursor += batch
            body = {"items": [it.model_dump() for it in chunk]}
            t = time.perf_counter()
            r = await ac.post("/v1/grade", json=body)
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
            for res in r.json()["results"]:
                statuses[res["status"]] = statuses.get(res["status"], 0) + 1
            graded += len(chunk)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as ac:
        t0 = time.perf_counter()
        stop_at = t0 + duration_s
        await asyncio.gather(*(client_loop(ac, stop_at) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "batch": batch, "requests": len(lat), "grades": graded, "wall_s": wall,
            "grades_per_s": graded / wall, **_pcts(lat), "statuses": statuses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=8.0, help="seconds per concurrency level")
    ap.add_argument("--batch", type=int, default=16, help="items per request (an actor grades n samples at once)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the service")
    ap.add_argument("--clients", type=str, default="1,2,4,8", help="concurrency levels")
    ap.add_argument("--cache", action="store_true", help="keep the service cache on (default off)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reward.json")
    args = ap.parse_args()
    console = Console()
    items = make_mix(20_000)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "reward", "--port", str(port), "--workers", str(args.workers),
           "--log-level", "warning"]
    if not args.cache:
        cmd += ["--cache-size", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("reward service did not start")
            time.sleep(0.2)
        asyncio.run(run_clients(url, items[:200], 2, args.batch, 1.0))  # warm-up
        for c in [int(x) for x in args.clients.split(",")]:
            res = asyncio.run(run_clients(url, items, c, args.batch, args.duration_s))
            rows.append(res)
            console.log(f"{c} clients: {res['grades_per_s']:.0f} grades/s, p50 {res['p50_ms']:.1f} ms")
        metrics = httpx.get(f"{url}/metrics", timeout=5.0).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    stage = {ln.split('"')[1]: float(ln.split()[-1]) for ln in metrics.splitlines()
             if ln.startswith("tbrm_reward_decided_total{")}

    # Baselines in this process, on one core, same mix, same run (after the service is gone).
    mv = baseline_math_verify(items, budget_s=args.duration_s)
    ours = baseline_ours_in_process(items, budget_s=args.duration_s)

    table = Table(title=f"reward service, {args.workers} workers, batch {args.batch}, cache {'on' if args.cache else 'off'}"
                        f" ({os.cpu_count()} cores)")
    for col in ("setup", "clients", "grades/s", "p50 ms", "p99 ms", "requests"):
        table.add_column(col, justify="right" if col != "setup" else "left")
    for r in rows:
        table.add_row("service over HTTP", str(r["clients"]), f"{r['grades_per_s']:.0f}", f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", str(r["requests"]))
    table.add_row("math-verify in-process (1 core, per item)", "-", f"{mv['grades_per_s']:.0f}",
                  f"{mv['p50_ms']:.2f}", f"{mv['p99_ms']:.2f}", "-")
    table.add_row("our pipeline in-process (1 core, per item)", "-", f"{ours['grades_per_s']:.0f}",
                  f"{ours['p50_ms']:.2f}", f"{ours['p99_ms']:.2f}", "-")
    console.print(table)
    console.print(f"decided by stage (service): {stage}")

    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load1": os.getloadavg()[0]},
        "config": {"workers": args.workers, "batch": args.batch, "duration_s": args.duration_s,
                   "cache": args.cache, "mix_items": len(items)},
        "service": rows,
        "decided_by_stage": stage,
        "math_verify_in_process_1core": mv,
        "our_pipeline_in_process_1core": ours,
        "goal_grades_per_s": 150,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
