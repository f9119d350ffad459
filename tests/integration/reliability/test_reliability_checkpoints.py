"""Checkpoint writing under crashes (issue 21), with a real DeepSpeed engine on CPU (learner/checkpoints.py):

- the checkpoint just written survives pruning even when the run directory holds higher-step tags of an earlier
  run (`resume = "never"`, a wiped Redis), and `latest` always names a directory that exists;
- `latest` moves only once every rank's RNG state is on disk: a crash in between leaves the previous checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from learner import checkpoints
from learner.checkpoints import latest_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def engine() -> Any:
    import deepspeed

    from learner.engine import configure_environment, forget_stale_deepspeed_world_group

    configure_environment()
    deepspeed.init_distributed(dist_backend="gloo")
    forget_stale_deepspeed_world_group()  # an earlier vLLM test in this process may have rebuilt the group
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    })
    return eng


def test_new_checkpoint_survives_higher_step_tags_of_an_earlier_run(engine: Any, tmp_path: Path) -> None:
    for step in (90, 100):  # an earlier run's checkpoints
        save_checkpoint(engine, tmp_path, step, step, rank=0, keep=2)
    tag = save_checkpoint(engine, tmp_path, 5, 101, rank=0, keep=2)  # a fresh start writes its first one
    assert (tmp_path / tag).is_dir(), "the checkpoint just written was pruned"
    assert latest_checkpoint(tmp_path) == tag == "step-00000005"
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert kept == ["step-00000005", "step-00000100"]  # the oldest written (step 90) went
    tag = save_checkpoint(engine, tmp_path, 10, 106, rank=0, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == [tag]
    assert latest_checkpoint(tmp_path) == tag


def test_latest_moves_only_after_the_rng_state_is_written(
    engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = save_checkpoint(engine, tmp_path, 1, 1, rank=0, keep=3)

    def crash() -> dict[str, Any]:
        raise RuntimeError("simulated crash while writing the RNG state")

    monkeypatch.setattr(checkpoints, "rng_state", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(engine, tmp_path, 2, 2, rank=0, keep=3)
    assert latest_checkpoint(tmp_path) == first  # resume uses the complete checkpoint, with its RNG state
    assert (tmp_path / first / "rng-rank0.json").exists()
