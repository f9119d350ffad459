"""Device-correct learner: DeepSpeed's accelerator follows the hardware, metric collectives use the process group's
device (CPU for gloo here; CUDA under NCCL), and the k8s GPU profiles set what the GPU processes need."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import yaml

from learner.collectives import collective_device, default_accelerator

REPO = Path(__file__).resolve().parents[3]


def test_accelerator_follows_the_hardware() -> None:
    assert default_accelerator() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_collectives_run_on_the_gloo_groups_device() -> None:
    dist = torch.distributed
    own = not dist.is_initialized()  # another test of this process may have set up a (gloo) group already
    if own:
        assert collective_device() == torch.device("cpu")  # no process group yet
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "gloo"
        dev = collective_device()
        t = torch.tensor([1.5, 2.0], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        assert dev == torch.device("cpu") and t.tolist() == [1.5 * dist.get_world_size(), 2.0 * dist.get_world_size()]
    finally:
        if own:
            dist.destroy_process_group()


def _env(path: Path, container: str) -> dict[str, str]:
    for doc in yaml.safe_load_all(path.read_text()):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c["name"] == container:
                return {e["name"]: e.get("value") for e in c.get("env", [])}
    raise AssertionError(f"no container {container} in {path}")


def test_gpu_overlays_set_the_gpu_environment() -> None:
    gpu = REPO / "deploy" / "k8s" / "overlays" / "gpu"
    assert _env(gpu / "learner-multinode.yaml", "learner")["DS_ACCELERATOR"] == "cuda"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in _env(gpu / "actor-gpu.yaml", "actor")
