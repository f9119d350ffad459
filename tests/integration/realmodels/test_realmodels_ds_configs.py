"""The GPU configs' DeepSpeed JSONs run through the learner's own config builder and `deepspeed.initialize` (on
CPU, gloo, with the tiny model in bf16): ZeRO-2 with bf16, and ZeRO-2 with the AdamW state offloaded (7B configs)
each take one optimizer step. What stays unverified here is only what needs CUDA (memory, NCCL, speed).

Each case runs in a fresh interpreter: a ZeRO-2 engine registers process groups in DeepSpeed's module state, which
would leak into later in-process learner tests of the same pytest session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

CHILD = r'''
import sys, tomllib
from pathlib import Path
import torch
from learner.model import load_causal_lm
from learner.settings import LearnerSettings
from learner.engine import configure_environment, deepspeed_config

repo, config, model_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
torch.set_num_threads(1)
configure_environment()
import deepspeed

if not torch.distributed.is_initialized():
    deepspeed.init_distributed(dist_backend="gloo")
section = tomllib.loads((repo / "configs" / config).read_text())["learner"]
ds_json = repo / section["ds_config_path"].removeprefix("/app/")
settings = LearnerSettings(model_path=model_dir, dtype=section["dtype"], ds_config_path=ds_json,
                           batch_size=4, micro_batch_size=2, grad_clip=section["grad_clip"])
model = load_causal_lm(model_dir, settings.dtype)
before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
engine, *_ = deepspeed.initialize(
    model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=deepspeed_config(settings, 1)
)
assert engine.zero_optimization_stage() == 2 and engine.bfloat16_enabled()
assert engine.zero_cpu_offload() == ("7b" in config), engine.zero_cpu_offload()
ids = torch.randint(0, 300, (2, 12))
loss = engine(input_ids=ids).logits.float().pow(2).mean()
engine.backward(loss)
engine.step()
changed = sum(not torch.equal(before[n], p.detach().float()) for n, p in engine.module.named_parameters())
assert changed > len(before) // 2, (changed, len(before))
print("OK", changed, len(before))
'''


@pytest.mark.parametrize("config", ["qwen2.5-math-1.5b.toml", "qwen2.5-math-7b.toml"])
def test_deepspeed_json_of_the_gpu_config_initializes_and_steps(config: str, tiny_model_dir: Path,
                                                                 port: int) -> None:
    env = {"MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    import os

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), config, str(tiny_model_dir)],
        env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
