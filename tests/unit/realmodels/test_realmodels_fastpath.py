"""The learner's fast paths for real models (learner/model.py): chunked log-probs over the vocabulary and bf16
autocast give the same log-probs, V(s_1) and gradients as the plain fp32 path, on the tiny random toy model.
Also the small file helpers of the real-model workflow (deploy/sft_cli.py, deploy/sft.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from buffer.schema import Trajectory
from learner.loss import tbrm_loss, token_logprobs
from learner.model import (
    autocast_context,
    collate,
    load_causal_lm,
    reference_logprobs,
    response_logits,
    response_logprobs,
)
from problems.files import load_dataset


def traj(prompt: list[int], response: list[int], reward: float) -> Trajectory:
    return Trajectory(
        prompt_id="p", group_id="g", prompt_token_ids=prompt, response_token_ids=response,
        behaviour_logprobs=[0.0] * len(response), reward=reward, grade_status="correct", policy_version=0,
    )  # fmt: skip


@pytest.fixture
def batch() -> object:
    # ragged prompts and responses, one empty response (V(s_1) still counts), more positions than a chunk
    return collate([
        traj([5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], 1.0),
        traj([5, 6, 7, 20, 21], [22, 23], 0.0),
        traj([30], [], 0.0),
    ])  # fmt: skip


def test_chunked_logprobs_match_full_logits(tiny_model_dir: Path, batch) -> None:
    model = load_causal_lm(tiny_model_dir, "float64", trainable=True)
    full_lp, full_v0 = token_logprobs(response_logits(model, batch).double(), batch.tokens, batch.mask)
    for chunk in (1, 3, 8, 64):
        lp, v0 = response_logprobs(model, batch, chunk=chunk)
        assert lp.shape == batch.tokens.shape
        torch.testing.assert_close(lp * batch.mask, full_lp * batch.mask)
        torch.testing.assert_close(v0, full_v0)
    # the reference wrapper masks padding and keeps V_ref(s_1)
    ref_lp, ref_v0 = reference_logprobs(model, batch)
    assert not ref_lp.requires_grad and float(ref_lp[2].abs().sum()) == 0.0
    torch.testing.assert_close(ref_v0, full_v0)


def test_chunked_gradients_match_full_logits(tiny_model_dir: Path, batch) -> None:
    """The TBRM loss built from chunked log-probs has the same gradient as `tbrm_loss` on the full logits."""
    model = load_causal_lm(tiny_model_dir, "float64", trainable=True)
    ref = torch.randn(batch.tokens.shape, dtype=torch.float64) * 0.1
    loss, _ = tbrm_loss(response_logits(model, batch).double(), batch.tokens, batch.mask, ref, batch.rewards, 0.02)
    loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    lp, v0 = response_logprobs(model, batch, chunk=4)
    ratio = torch.where(batch.mask.bool(), lp - ref, torch.zeros_like(lp)).sum(1)
    (v0 + ratio - batch.rewards.double() / 0.02).pow(2).mean().backward()
    for n, p in model.named_parameters():
        # HF's RMSNorm and rotary embeddings compute in fp32 even in an fp64 model: agreement to ~1e-7 relative
        scale = float(full[n].abs().max())
        torch.testing.assert_close(p.grad, full[n], rtol=1e-5, atol=1e-6 * scale, msg=n)


def test_bf16_autocast_is_close_and_keeps_fp32_weights(tiny_model_dir: Path, batch) -> None:
    model = load_causal_lm(tiny_model_dir, "float32", trainable=True)
    lp32, v32 = token_logprobs(response_logits(model, batch), batch.tokens, batch.mask)
    logits = response_logits(model, batch, autocast="bfloat16")
    assert logits.dtype == torch.float32  # the loss always sees fp32
    lp16, v16 = token_logprobs(logits, batch.tokens, batch.mask)
    m = batch.mask.bool()
    assert (lp16[m] - lp32[m]).abs().max() < 0.1 and (v16 - v32).abs().max() < 0.1
    assert not torch.equal(lp16[m], lp32[m])  # it really ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with autocast_context(model, None), autocast_context(model, "float32"):
        assert not torch.is_autocast_enabled("cpu")


def test_data_toy_writes_disjoint_verl_splits(tmp_path: Path) -> None:
    from deploy.cli import app

    res = CliRunner().invoke(app, ["data", "toy", str(tmp_path), "--digits", "1", "--ops", "+-*", "--n-test", "60"])
    assert res.exit_code == 0, res.output
    train, test = load_dataset(tmp_path / "train.parquet"), load_dataset(tmp_path / "test.parquet")
    assert len(test) == 60
    assert not {p.messages[-1]["content"] for p in train} & {p.messages[-1]["content"] for p in test}
    assert all(str(eval(p.messages[-1]["content"][8:-1])) == p.gold for p in test[:20])  # digits only
    bad = CliRunner().invoke(app, ["data", "toy", str(tmp_path), "--digits", "1", "--n-test", "500"])
    assert bad.exit_code != 0 and "no training problems" in bad.output


def test_model_from_run_builds_an_hf_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    from deploy.cli import app
    from learner.weights import export_weights

    run = tmp_path / "run"
    model = load_causal_lm(tiny_model_dir, "float32", trainable=True)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    for v in (2, 10):  # the newest version by number, not by name order
        export_weights(model, run / "learner" / "weights", v)
    (run / "config.toml").write_text(f'[learner]\nmodel_path = "{tiny_model_dir}"\n')
    res = CliRunner().invoke(app, ["model", "from-run", str(run), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "policy-v00000010" in res.output
    loaded = load_causal_lm(tmp_path / "out", "float32", trainable=False)
    torch.testing.assert_close(next(loaded.parameters()), next(model.parameters()))
    empty = tmp_path / "empty"
    (empty / "weights").mkdir(parents=True)
    assert CliRunner().invoke(app, ["model", "from-run", str(empty), str(tmp_path / "x")]).exit_code != 0


def test_sft_cli_rejects_bad_input(tmp_path: Path) -> None:
    from deploy.cli import app

    res = CliRunner().invoke(app, ["sft", "m", str(tmp_path / "o"), "--data", str(tmp_path / "missing.parquet")])
    assert res.exit_code == 2 and "missing.parquet" in res.output
    res = CliRunner().invoke(app, ["sft", "m", "o", "--data", "x", "--autocast", "fp8"])
    assert res.exit_code != 0 and "autocast" in res.output
