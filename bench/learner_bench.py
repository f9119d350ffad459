"""Learner step benchmark: TBRM vs GRPO vs a plain supervised (SFT) step on the same tokens, plus the reference
forward, for a tiny and a ~25M-parameter Qwen2 built from a config (random weights, CPU, plain torch).

Run: `make bench-learner` or `.venv/bin/python bench/learner_bench.py [--models tiny,medium] [--threads 1]`.
Prints a rich table and writes bench/results/learner.json.

What one "step" is (identical for every method): zero_grad -> policy forward (logits only at the T+1 kept
positions, as the learner does) -> loss (`learner.loss.tbrm_loss` / `grpo_loss` / `sft_loss`) -> backward ->
clip_grad_norm_(1.0) -> AdamW step. TBRM and GRPO read cached reference / behaviour log-probs, so their step excludes
the reference model; `ref_forward` (no-grad forward of the frozen reference + `token_logprobs`) is timed on its own:
it is paid once per trajectory, and not at all on replays (its result is cached into the buffer item).

Method:
* Time: one subprocess per model runs every method round-robin (the order rotates every repetition) after a
  warm-up step each, and reports the median wall time per step; interleaving keeps the ratios fair on a shared,
  noisy machine (the absolute times depend on the load of the other processes on the box; see `load_avg`).
* Memory: tracemalloc cannot see torch's allocations, so each (model, method) runs in a FRESH subprocess with
  `MALLOC_MMAP_THRESHOLD_` fixed (large tensors are mmapped and returned to the OS on free). After three steps:
  `peak_rss` = getrusage(RUSAGE_SELF).ru_maxrss (the process's high-water mark, reached inside a step), `resting_rss`
  = current RSS from /proc/self/statm between steps after malloc_trim (parameters + AdamW state + Python/torch),
  and `step_peak` = peak_rss - resting_rss: the extra memory one step needs (activations, logits, gradients).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "learner.json"

# name -> Qwen2 shape and batch. `medium` has a real-sized vocabulary so the [B, T, V] loss work is realistic.
MODELS: dict[str, dict[str, int]] = {
    "tiny": {"vocab": 512, "hidden": 128, "inter": 256, "layers": 4, "heads": 4, "kv_heads": 2,
             "batch": 16, "prompt": 64, "response": 192},
    "medium": {"vocab": 32000, "hidden": 384, "inter": 1024, "layers": 8, "heads": 6, "kv_heads": 2,
               "batch": 8, "prompt": 64, "response": 192},
}  # fmt: skip
STEP_METHODS = ["sft", "tbrm", "grpo"]
METHODS = [*STEP_METHODS, "ref_forward"]
BETA = 0.002  # the paper's: r/beta = 500, the hardest case numerically (same cost as any beta)


# ------------------------------------------------------------------------------------------------ child side


def build(name: str, seed: int = 0) -> dict[str, Any]:
    """Model, optimizer and one fixed batch (random tokens, ragged response lengths, binary rewards)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner.loss import token_logprobs

    spec = MODELS[name]
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).float().train()
    b, p, t = spec["batch"], spec["prompt"], spec["response"]
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, spec["vocab"], (b, p + t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [B, T] right-padded responses
    tokens = input_ids[:, p:]  # [B, T]
    with torch.no_grad():
        logits = model(input_ids=input_ids, logits_to_keep=t + 1, use_cache=False).logits[:, :t]
        ref_lp, ref_v0 = token_logprobs(logits, tokens, mask)
    del logits
    batch = {
        "input_ids": input_ids,
        "tokens": tokens,
        "mask": mask,
        "ref_logprobs": ref_lp,
        "ref_v0": ref_v0,
        "behaviour_logprobs": ref_lp + 0.05 * torch.randn(b, t, generator=g),  # a slightly different actor
        "rewards": (torch.rand(b, generator=g) < 0.5).float(),
        "group_ids": torch.arange(b) // 4,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    return {"model": model, "optimizer": optimizer, "batch": batch, "spec": spec, "config": config}


def run_step(env: dict[str, Any], method: str, ref_model: Any = None) -> float:
    """One step of `method`; returns the loss value."""
    import torch

    from learner.loss import grpo_loss, sft_loss, tbrm_loss, token_logprobs

    b, t = env["batch"], env["spec"]["response"]
    if method == "ref_forward":
        with torch.no_grad():
            logits = ref_model(input_ids=b["input_ids"], logits_to_keep=t + 1, use_cache=False).logits[:, :t]
            lp, _ = token_logprobs(logits, b["tokens"], b["mask"])
        return lp.sum().item()
    model, opt = env["model"], env["optimizer"]
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=b["input_ids"], logits_to_keep=t + 1, use_cache=False).logits[:, :t]  # [B, T, V]
    if method == "tbrm":
        loss, _ = tbrm_loss(logits, b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA)
    elif method == "grpo":
        loss, _ = grpo_loss(
            logits, b["tokens"], b["mask"], b["behaviour_logprobs"], b["rewards"], b["group_ids"]
        )
    elif method == "sft":
        loss, _ = sft_loss(logits, b["tokens"], b["mask"])
    else:
        raise ValueError(f"unknown method {method!r}")
    del logits
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def make_ref(env: dict[str, Any]) -> Any:
    import copy

    ref = copy.deepcopy(env["model"]).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def child_time(name: str, reps: int) -> dict[str, Any]:
    env = build(name)
    ref = make_ref(env)
    for m in METHODS:  # warm-up: first-call allocations, AdamW state
        run_step(env, m, ref)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(reps):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for m in order:
            t0 = time.perf_counter()
            run_step(env, m, ref)
            times[m].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in env["model"].parameters())
    return {"params": n_params, "times_s": times, "loss_only_times_s": loss_only_times(env, 4 * reps)}


def loss_only_times(env: dict[str, Any], reps: int) -> dict[str, list[float]]:
    """Loss forward + backward on fixed leaf logits: the only part of the step where the methods differ."""
    import torch

    from learner.loss import grpo_loss, sft_loss, tbrm_loss

    b, spec = env["batch"], env["spec"]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(spec["batch"], spec["response"], spec["vocab"], generator=g).requires_grad_(True)
    fns = {
        "sft": lambda z: sft_loss(z, b["tokens"], b["mask"]),
        "tbrm": lambda z: tbrm_loss(z, b["tokens"], b["mask"], b["ref_logprobs"], b["rewards"], BETA),
        "grpo": lambda z: grpo_loss(
            z, b["tokens"], b["mask"], b["behaviour_logprobs"], b["rewards"], b["group_ids"]
        ),
    }
    times: dict[str, list[float]] = {m: [] for m in fns}
    for r in range(reps + 1):
        for m in STEP_METHODS[r % 3 :] + STEP_METHODS[: r % 3]:
            logits.grad = None
            t0 = time.perf_counter()
            loss, _ = fns[m](logits)
            loss.backward()
            if r > 0:  # the first round is a warm-up
                times[m].append(time.perf_counter() - t0)
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_mem(name: str, method: str) -> dict[str, Any]:
    env = build(name)
    ref = None
    if method == "ref_forward":  # only the frozen reference: no optimizer state, no grads
        ref = make_ref(env)
        del env["model"], env["optimizer"]
    libc = ctypes.CDLL("libc.so.6")
    resting = []
    for _ in range(3):
        run_step(env, method, ref)
        if method != "ref_forward":
            env["optimizer"].zero_grad(set_to_none=True)
        gc.collect()
        libc.malloc_trim(0)
        resting.append(rss_bytes())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_rss": peak, "resting_rss": min(resting), "step_peak": peak - min(resting)}


# ----------------------------------------------------------------------------------------------- parent side


def run_child(args: list[str], threads: int, timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        MALLOC_MMAP_THRESHOLD_="131072",  # fixed threshold: big tensors are mmapped, freed memory leaves the RSS
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(name: str, timing: dict[str, Any], memory: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec = MODELS[name]
    times = timing["times_s"]
    med = {m: statistics.median(v) for m, v in times.items()}
    low = {m: min(v) for m, v in times.items()}
    loss_med = {m: statistics.median(v) for m, v in timing["loss_only_times_s"].items()}
    tokens = spec["batch"] * (spec["prompt"] + spec["response"])
    rows: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        rows[m] = {
            "step_time_median_s": med[m],
            "step_time_min_s": low[m],
            "step_times_s": times[m],
            "tokens_per_s": tokens / med[m],
            "time_vs_sft": med[m] / med["sft"],
            "time_vs_sft_of_min": low[m] / low["sft"],
            **memory[m],
            "step_peak_vs_sft": memory[m]["step_peak"] / memory["sft"]["step_peak"],
        }
        if m in loss_med:
            rows[m]["loss_only_median_s"] = loss_med[m]
            rows[m]["loss_only_times_s"] = timing["loss_only_times_s"][m]
    rows["tbrm"]["time_with_ref_forward_vs_sft"] = (med["tbrm"] + med["ref_forward"]) / med["sft"]
    return {
        "model": {**spec, "params": timing["params"]},
        "batch_tokens": tokens,
        "logits_bytes_fp32": spec["batch"] * (spec["response"] + 1) * spec["vocab"] * 4,
        "methods": rows,
    }


COLUMNS = ["model", "method", "step ms (median)", "x SFT", "step ms (min)", "x SFT", "loss fwd+bwd ms",
           "tokens/s", "peak RSS MiB", "step peak MiB", "x SFT"]  # fmt: skip


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    mib = 2**20
    table = Table(title=f"learner step, CPU, {results['threads']} thread(s), plain torch + AdamW")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for name, res in results["models"].items():
        spec = res["model"]
        label = f"{name} {spec['params'] / 1e6:.1f}M {spec['batch']}x({spec['prompt']}+{spec['response']})"
        for m, row in res["methods"].items():
            table.add_row(
                label if m == METHODS[0] else "",
                m,
                f"{row['step_time_median_s'] * 1e3:.1f}",
                f"{row['time_vs_sft']:.3f}",
                f"{row['step_time_min_s'] * 1e3:.1f}",
                f"{row['time_vs_sft_of_min']:.3f}",
                f"{row['loss_only_median_s'] * 1e3:.2f}" if "loss_only_median_s" in row else "",
                f"{row['tokens_per_s']:.0f}",
                f"{row['peak_rss'] / mib:.0f}",
                f"{row['step_peak'] / mib:.0f}",
                f"{row['step_peak_vs_sft']:.3f}",
            )
        ratio = res["methods"]["tbrm"]["time_with_ref_forward_vs_sft"]
        table.add_row("", "tbrm + ref_forward", "", f"{ratio:.3f}", *[""] * (len(COLUMNS) - 4))
        table.add_section()
    Console(width=170).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,medium", help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions per method (0: 12 tiny, 4 medium)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON results path")
    ap.add_argument("--child", choices=["time", "mem"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "time":
            out = child_time(args.model, args.reps)
        else:
            out = child_mem(args.model, args.method)
        sys.stdout.write(json.dumps(out) + "\n")
        return

    import torch
    import transformers
    from rich.console import Console

    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    results: dict[str, Any] = {
        "benchmark": "learner_step",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_start": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "threads": args.threads,
        "beta": BETA,
        "method": "time: median of round-robin steps in one process; memory: ru_maxrss minus resting RSS in a "
        "fresh process per (model, method); see bench/learner_bench.py docstring",
        "models": {},
    }
    for n in names:
        reps = args.reps or (12 if n == "tiny" else 4)
        t0 = time.time()
        timing = run_child(["--child", "time", "--model", n, "--reps", str(reps)], args.threads, 3000)
        memory = {
            m: run_child(["--child", "mem", "--model", n, "--method", m], args.threads, 1200) for m in METHODS
        }
        results["models"][n] = summarize(n, timing, memory)
        results["models"][n]["bench_wall_s"] = time.time() - t0
    results["machine"]["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    Console(width=170).print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
