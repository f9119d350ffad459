"""The GPU configs' DeepSpeed JSONs run through the learner's own config builder and `deepspeed.initialize` (on
CPU, gloo, with the tiny model in bf16): ZeRO-2 with bf16, and ZeRO-2 with the AdamW state offloaded (7B configs)
each take one optimizer step. What stays unverified here is only what needs CUDA (memory, NCCL, speed)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("config", ["qwen2.5-math-1.5b.toml", "qwen2.5-math-7b.toml"])
def test_deepspeed_json_of_the_gpu_config_initializes_and_steps(config: str, tiny_model_dir: Path) -> None:
    from learner.model import load_causal_lm
    from learner.settings import LearnerSettings
    from learner.train import configure_environment, deepspeed_config

    torch.set_num_threads(1)
    configure_environment()
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    section = tomllib.loads((REPO / "configs" / config).read_text())["learner"]
    ds_json = REPO / section["ds_config_path"].removeprefix("/app/")
    settings = LearnerSettings(model_path=tiny_model_dir, dtype=section["dtype"], ds_config_path=ds_json,
                               batch_size=4, micro_batch_size=2, grad_clip=section["grad_clip"])  # fmt: skip
    model = load_causal_lm(tiny_model_dir, settings.dtype)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=deepspeed_config(settings, 1)
    )
    assert engine.zero_optimization_stage() == 2 and engine.bfloat16_enabled()
    assert engine.zero_cpu_offload() == ("7b" in config)
    ids = torch.randint(0, 300, (2, 12))
    loss = engine(input_ids=ids).logits.float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    changed = sum(not torch.equal(before[n], p.detach().float()) for n, p in engine.module.named_parameters())
    assert changed > len(before) // 2
