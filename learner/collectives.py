"""Where the learner's metric collectives run: on the device of the process group's backend.

NCCL only reduces CUDA tensors and gloo only CPU ones; the metric all-reduces (`all_reduce_sum`, `all_reduce_max`)
build their small float64 tensors on `collective_device()` so the same code runs on a CPU (gloo) and a GPU (NCCL)
learner.
"""

from __future__ import annotations

import torch


def collective_device() -> torch.device:
    """CUDA (this rank's current device) when the default process group is NCCL, else CPU."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_accelerator() -> str:
    """DeepSpeed's accelerator for this machine (DS_ACCELERATOR when unset): cuda with a visible GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def all_reduce_sum(values: list[float], world_size: int) -> list[float]:
    """Element-wise sum of `values` over the ranks (the values themselves with one rank)."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, world_size: int) -> float:
    """The largest `value` of any rank."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t[0])
