"""GPU checks of the device-correct learner (issue 15), `gpu`-marked: deselected by default, skipped without CUDA
(tests/conftest.py); run on a GPU machine with `pytest -m gpu tests/integration/gpu`.

Each runs in a fresh Python process with the environment a GPU deployment has (no DS_ACCELERATOR: the learner
picks cuda itself; the test suite's conftest pins cpu for the CPU tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.gpu


def gpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_python(script: str, tmp_path: Path, *args: str, timeout_s: float = 300) -> str:
    path = tmp_path / "check.py"
    path.write_text(script)
    res = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, cwd=REPO,
                         env=gpu_env(), timeout=timeout_s)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


ACCELERATOR = """
from learner.engine import configure_environment
configure_environment()
import os
from deepspeed.accelerator import get_accelerator
print(os.environ["DS_ACCELERATOR"], get_accelerator().device_name())
"""


def test_deepspeed_accelerator_is_cuda(tmp_path: Path) -> None:
    assert run_python(ACCELERATOR, tmp_path).split()[-2:] == ["cuda", "cuda"]


COLLECTIVES = """
import os, socket, sys
import torch
import torch.distributed as dist
from learner.collectives import all_reduce_max, all_reduce_sum, collective_device


def rank_main(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        dev = collective_device()
        assert dev == torch.device("cuda", rank), dev
        t = torch.tensor([1.0, float(rank)], dtype=torch.float64, device=dev)
        dist.all_reduce(t)  # NCCL on the device collective_device() names (a CPU tensor fails here)
        assert t.tolist() == [float(world), float(sum(range(world)))], t
        assert all_reduce_sum([rank + 1.0, 2.0], world) == [world * (world + 1) / 2, 2.0 * world]
        assert all_reduce_max(float(rank), world) == world - 1
        if rank == 0:
            print("ok", world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    world = min(2, torch.cuda.device_count())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(rank_main, args=(world, port), nprocs=world)
"""


def test_metric_collectives_run_on_cuda_under_nccl(tmp_path: Path) -> None:
    """One rank per GPU (two when there are two; one rank still runs NCCL on the device collective_device()
    names)."""
    out = run_python(COLLECTIVES, tmp_path).split()
    assert out[:1] == ["ok"], out
