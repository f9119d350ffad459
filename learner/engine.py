"""Learner setup: the process environment, the DeepSpeed engine (policy, optimizer, lr schedule, frozen reference)
and resuming it from its newest checkpoint. `learner/train.py` calls these once before the loop."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import torch_extensions_dir
from learner.checkpoints import latest_checkpoint, set_rng_state
from learner.collectives import default_accelerator
from learner.model import load_causal_lm
from learner.settings import ConstantSchedule, LearnerSettings

log = logging.getLogger(__name__)


def ensure_single_process_env() -> None:
    """DeepSpeed needs the torch.distributed variables even for one process (else it looks for MPI)."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free))


STALE_BUILD_LOCK_S = 300.0
"""A compiled-op build lock older than this is a leftover of a killed build (a build takes under a minute)."""


def configure_environment() -> None:
    """DeepSpeed's accelerator follows the hardware (cuda with a GPU, else cpu) unless DS_ACCELERATOR is set, and a
    persistent cache for its compiled ops (the first build takes ~25 s)."""
    os.environ.setdefault("DS_ACCELERATOR", default_accelerator())
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    ensure_single_process_env()


def clear_stale_build_locks(extensions_dir: Path, max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove build locks a killed process left in the compiled-op cache; returns the removed paths.

    torch builds an op under an exclusive `lock` file in its folder and every other process waits for the file to
    go away, with no owner recorded and no timeout: a learner killed mid-build (Ctrl-C or SIGKILL at its first
    start) left every later start waiting silently forever. A lock younger than `max_age_s` may belong to a build
    running now (another rank, another run on the same cache) and is kept.
    """
    removed = []
    for lock in extensions_dir.glob("*/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed a stale build lock %s (%.0f s old, left by a killed build)", lock, age)
        except FileNotFoundError:  # the build finished meanwhile
            continue
    return removed


def init_distributed(settings: LearnerSettings) -> tuple[int, int]:
    """Join the process group (gloo on CPU, nccl with a GPU); returns (rank, world size)."""
    import deepspeed  # heavy; after the environment is set

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    forget_stale_deepspeed_world_group()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if settings.batch_size % world:
        raise ValueError(f"batch_size={settings.batch_size} must be divisible by the {world} data-parallel ranks")
    return rank, world


def forget_stale_deepspeed_world_group() -> None:
    """Drop DeepSpeed's cached clone of the world group if its process group no longer exists.

    DeepSpeed caches that clone at module level. When another library in the same process tears the default process
    group down and builds a new one (vLLM's in-process engine does, e.g. `tbrm eval` or tests that run both), the
    cached group is unregistered and `deepspeed.initialize` fails with "Group ... is not registered"."""
    from deepspeed.utils import groups

    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is not None and cached not in torch.distributed.distributed_c10d._world.pg_group_ranks:
        groups._WORLD_GROUP = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(settings: LearnerSettings) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step `s` (warm-up, then constant or cosine)."""
    sched = settings.schedule

    def f(s: int) -> float:
        if sched.warmup_steps and s < sched.warmup_steps:
            return (s + 1) / sched.warmup_steps
        if isinstance(sched, ConstantSchedule):
            return 1.0
        decay = sched.decay_steps or max(1, (settings.max_steps or 1) - sched.warmup_steps)
        progress = min(1.0, (s - sched.warmup_steps) / decay)
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(settings: LearnerSettings, world_size: int) -> dict[str, Any]:
    """The user's JSON (if any) with the batch and clipping keys this loop owns filled in.

    The loop does its own gradient accumulation over a variable number of micro-batches, so DeepSpeed runs with
    `managed_gradient_accumulation: false`: `backward` only accumulates, `step` reduces across ranks and updates.
    """
    cfg: dict[str, Any] = {}
    if settings.ds_config_path:
        cfg = json.loads(Path(settings.ds_config_path).read_text())
    else:
        cfg["zero_optimization"] = {"stage": settings.zero_stage}
    cfg["train_micro_batch_size_per_gpu"] = settings.micro_batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = settings.micro_batch_size * world_size
    cfg["managed_gradient_accumulation"] = False
    cfg["zero_allow_untested_optimizer"] = True  # a client torch AdamW: no optimizer op to compile
    if settings.grad_clip is not None:
        cfg["gradient_clipping"] = settings.grad_clip
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def build_engine(settings: LearnerSettings, world: int) -> tuple[Any, torch.nn.Module | None]:
    """The DeepSpeed engine of the trainable policy (AdamW, LambdaLR) and the frozen reference model (None when the
    loss needs no reference log-probs), on the engine's device."""
    import deepspeed

    for path in (settings.model_path, settings.ref_model_path):
        if path is not None and not (Path(path) / "config.json").exists():
            raise FileNotFoundError(
                f"no HF model at {path} (config.json missing); build the toy model with `tbrm toy-model` "
                "or set model_path"
            )
    policy = load_causal_lm(settings.model_path, settings.dtype, trainable=True)
    if settings.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if settings.loss.needs_ref_logprobs:
        ref_model = load_causal_lm(settings.ref_model_path or settings.model_path, settings.dtype, trainable=False)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=settings.lr, betas=settings.adam_betas, eps=settings.adam_eps,
        weight_decay=settings.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    engine, _, _, _ = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(settings, world)
    )
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 partitions the parameters: engine.module.state_dict() is not the HF state dict to push
        raise ValueError("ZeRO stage 3 is not supported (weight export needs full parameters); use stage <= 2")
    if ref_model is not None:
        ref_model.to(engine.device)
    return engine, ref_model


def resume(engine: Any, ckpt_dir: Path, settings: LearnerSettings, rank: int) -> tuple[int, int, str | None]:
    """Restore the newest checkpoint (model, optimizer, scheduler, this rank's RNG) as `settings.resume` says;
    returns (step, policy_version, tag), (0, 0, None) for a fresh start."""
    tag = None if settings.resume == "never" else latest_checkpoint(ckpt_dir)
    if settings.resume == "must" and tag is None:
        raise FileNotFoundError(f"resume='must' but no checkpoint in {ckpt_dir}")
    if tag is None:
        return 0, 0, None
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    step, version = int(client_state["step"]), int(client_state["policy_version"])
    rng_file = ckpt_dir / tag / f"rng-rank{rank}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    log.info("resumed from %s: step %d, policy_version %d", tag, step, version)
    return step, version, tag
