"""SmolLM2-135M-Instruct learner step on CPU, before and after the speed work: tokens/s and peak memory per variant.

Run: `make bench-learner` (after `tbrm model smollm2 --out .cache/smollm2-135m-instruct`; skipped without it) or
`.venv/bin/python bench/learner_smollm2.py [--threads 2] [--reps 3] [--variants fp32,bf16,...]`.
Writes bench/results/learner_smollm2.json and prints a table.

One step = what the learner does per micro-batch of TBRM: reference forward (no grad) -> policy forward ->
`tbrm_loss` -> backward -> clip_grad_norm_(1.0) -> AdamW step, on a fixed batch of real token ids (the chat-
templated toy prompt and answers of the real task, lengths as in configs/smollm2-cpu.toml, plus a long-answer shape).

Variants (each in a FRESH process: its peak RSS is its own):
* `fp32`          before: fp32 forward, fp32 [B, T, V] logits into `tbrm_loss` (the learner's original path).
* `bf16`          `torch.autocast("cpu", bfloat16)` around both forwards (`[learner] autocast = "bfloat16"`).
* `bf16+ckpt`     bf16 + gradient checkpointing of the decoder layers (`gradient_checkpointing = true`).
* `bf16+chunked`  bf16 + `learner.model.response_logprobs`: the LM head and logsumexp over the 49k vocabulary in
                  chunks of 8 positions under checkpointing, never a [B, T, V] tensor (loss from the log-probs).
Reported: median step time, tokens/s (prompt + response tokens of the batch / step time), peak RSS
(getrusage ru_maxrss), resting RSS between steps (parameters + AdamW state + reference copy) and the step's extra
memory (peak - resting). LoRA is not measured: `peft` is not installed here and the full model fits (about 2.4 GB
resting with AdamW state and the reference copy), so it would only trade quality for a smaller optimizer state.
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
RESULTS = REPO / "bench" / "results" / "learner_smollm2.json"
DEFAULT_MODEL = REPO / ".cache" / "smollm2-135m-instruct"
VARIANTS = ["fp32", "bf16", "bf16+ckpt", "bf16+chunked"]
SHAPES: dict[str, dict[str, int]] = {
    "task": {"batch": 16, "prompt": 48, "response": 24},  # the real-model run: short answers
    "long": {"batch": 8, "prompt": 64, "response": 256},  # long answers: where the [B, T, V] logits dominate
}
BETA = 0.002


def _batch(tok: Any, shape: dict[str, int], seed: int = 0) -> Any:
    """A fixed micro-batch of real token ids: chat-templated prompts, answers cut/padded to the response length."""
    import random

    from buffer.schema import Trajectory
    from learner.model import collate

    rng = random.Random(seed)
    trajs = []
    for i in range(shape["batch"]):
        a, b = rng.randrange(10), rng.randrange(10)
        msgs = [{"role": "system", "content": "Put the final answer in \\boxed{}."},
                {"role": "user", "content": f"What is {a}*{b}? " + "Think step by step. " * 8}]  # fmt: skip
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if not isinstance(prompt, list):  # transformers 5 returns a BatchEncoding
            prompt = list(prompt["input_ids"])
        prompt = prompt[-shape["prompt"] :]
        text = f"{a} times {b} is {a * b}. " * 40 + f"\\boxed{{{a * b}}}"
        resp = tok(text, add_special_tokens=False)["input_ids"][: rng.randint(shape["response"] // 2, shape["response"])]
        trajs.append(Trajectory(prompt_id=str(i), group_id=str(i), prompt_token_ids=prompt, response_token_ids=resp,
                                behaviour_logprobs=[0.0] * len(resp), reward=float(i % 2), grade_status="correct",
                                policy_version=0))  # fmt: skip
    return collate(trajs)


def _loss(policy: Any, mb: Any, variant: str, ref_lp: Any) -> Any:
    import torch

    from learner.loss import tbrm_loss
    from learner.model import response_logits, response_logprobs

    autocast = None if variant == "fp32" else "bfloat16"
    if variant.endswith("chunked"):
        logp, v0 = response_logprobs(policy, mb, autocast)
        ratio = torch.where(mb.mask.bool(), logp - ref_lp, torch.zeros_like(logp)).sum(1)
        return (v0 + ratio - mb.rewards / BETA).pow(2).mean()
    loss, _ = tbrm_loss(response_logits(policy, mb, autocast), mb.tokens, mb.mask, ref_lp, mb.rewards, BETA)
    return loss


def child(model_dir: str, variant: str, shape_name: str, reps: int) -> dict[str, Any]:
    """Time `reps` steps (after one warm-up step) and measure memory, in this fresh process."""
    import torch
    from transformers import AutoTokenizer

    from learner.model import load_causal_lm, reference_logprobs

    shape = SHAPES[shape_name]
    tok = AutoTokenizer.from_pretrained(model_dir)
    mb = _batch(tok, shape)
    policy = load_causal_lm(model_dir, "float32", trainable=True)
    if variant.endswith("ckpt"):
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = load_causal_lm(model_dir, "float32", trainable=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    autocast = None if variant == "fp32" else "bfloat16"
    libc = ctypes.CDLL("libc.so.6")
    times, resting = [], []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        ref_lp, _ = reference_logprobs(ref, mb, autocast)
        opt.zero_grad(set_to_none=True)
        loss = _loss(policy, mb, variant, ref_lp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if r > 0:  # the first step allocates AdamW's state
            times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
        del loss
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/statm") as f:
            resting.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    med = statistics.median(times)
    return {"variant": variant, "shape": shape_name, **shape, "tokens": mb.n_tokens, "step_times_s": times,
            "step_time_median_s": med, "tokens_per_s": mb.n_tokens / med, "peak_rss": peak,
            "resting_rss": min(resting), "step_peak": peak - min(resting)}  # fmt: skip


def run_child(args: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="131072")  # fmt: skip
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=1800, check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    mib = 2**20
    table = Table(title=f"SmolLM2-135M TBRM learner step (ref fwd + fwd + bwd + AdamW), {results['threads']} "
                        f"thread(s), load {results['machine']['load_avg_start'][0]:.1f}")  # fmt: skip
    for col in ("shape", "variant", "step s", "tokens/s", "x fp32", "peak RSS MiB", "resting MiB", "step peak MiB"):
        table.add_column(col, justify="left" if col in ("shape", "variant") else "right")
    for shape, rows in results["shapes"].items():
        base = rows.get("fp32", {}).get("tokens_per_s")
        for v, row in rows.items():
            s = SHAPES[shape]
            table.add_row(f"{shape} {s['batch']}x({s['prompt']}+{s['response']})" if v == next(iter(rows)) else "", v,
                          f"{row['step_time_median_s']:.2f}", f"{row['tokens_per_s']:.0f}",
                          f"{row['tokens_per_s'] / base:.2f}" if base else "", f"{row['peak_rss'] / mib:.0f}",
                          f"{row['resting_rss'] / mib:.0f}", f"{row['step_peak'] / mib:.0f}")  # fmt: skip
        table.add_section()
    Console(width=150).print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL), help="converted SmolLM2 folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        sys.stdout.write(json.dumps(child(args.model_dir, *args.child, args.reps)) + "\n")
        return
    if not (Path(args.model_dir) / "config.json").exists():
        print(f"skipped: no SmolLM2 folder at {args.model_dir} (tbrm model smollm2 --out {args.model_dir})")
        return
    import torch

    results: dict[str, Any] = {
        "benchmark": "learner_step_smollm2", "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_start": os.getloadavg()},
        "torch": torch.__version__, "threads": args.threads, "reps": args.reps, "shapes": {},
    }  # fmt: skip
    for shape in args.shapes.split(","):
        results["shapes"][shape] = {}
        for v in args.variants.split(","):
            extra = ["--model-dir", args.model_dir, "--reps", str(args.reps), "--child", v, shape]
            results["shapes"][shape][v] = run_child(extra, args.threads)
            print(json.dumps({k: results["shapes"][shape][v][k] for k in ("variant", "shape", "step_time_median_s",
                                                                          "tokens_per_s", "peak_rss")}), flush=True)  # fmt: skip
    results["machine"]["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
