"""The toy model's warm-up: supervised fine-tuning (SFT) of the fresh toy model on the toy arithmetic task, so that
RL starts from a partial, improvable policy (deploy.toy_model builds, warms up and caches the model).

Why here (deploy) and not in the actor service: the warm-up is a training stage before RL, like `tbrm sft`
(deploy/sft.py) for real models; a sampling service should not carry a trainer. deploy may import every package,
and nothing but deploy (and the tests) builds the toy model.

Targets: a short column-arithmetic scratchpad ending in the boxed answer (see `toy_response`), at most 30 tokens
with the eos token ``<|im_end|>``: ``"37+45:7+5=12,3+4+1=8. \\boxed{82}"``,
``"-:45-37:15-7=8,4-3-1=0. \\boxed{-8}"``. Answers printed directly (``"37+45=82. \\boxed{82}"``) learned far
slower (3% held-out accuracy after 1000 steps, against 28% after 360 with the scratchpad). Prompts are rendered
exactly as the actor renders them: `TOY_SYSTEM_PROMPT`, then `apply_chat_template([system, user],
add_generation_prompt=True)`.

Training: AdamW on (templated prompt, target) pairs, loss on response tokens only, held-out accuracy checked every
20 steps, every 4 once it passes 8% (teacher-forced exact match, then confirmed by real greedy decoding), stop at
the first check >= 25%, so every build starts RL from about the same level.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actor_service.schema import TOY_SYSTEM_PROMPT

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]
"""(prompt tokens after the shared prefix, response tokens + eos)."""

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

    ``37+45`` -> ``"37+45:7+5=12,3+4+1=8. \\boxed{82}"``; ``37-45`` -> ``"-:45-37:15-7=8,4-3-1=0. \\boxed{-8}"``,
    ``45-37`` -> ``"+:45-37:15-7=8,4-3-1=0. \\boxed{8}"``: subtraction is worked larger-minus-smaller, with the
    borrow written out, after a sign token that says whether the operands are swapped. Every scratch token
    depends on at most three digits at fixed offsets, so a tiny model learns it in a few hundred steps; printing
    the answer directly (most significant digit first, carry hidden) took several times longer to reach the same
    accuracy. The sign token makes the one comparison a decision RL can credit: without it the swap hid in the
    first copied digit, and on builds that had not learned it RL settled on never (or always) swapping: 0 of 51
    negative results and +34 points in 5 minutes on one build, against +45 to +49.5 (three runs) with the sign.
    Problems the scratchpad does not cover (other shapes) fall back to ``"\\boxed{gold}"``.
    """
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
    sign = "-" if a < b else "+"
    return f"{sign}:{x}-{y}:{top}-{y % 10}={units},{x // 10}-{y // 10}-{borrow}={tens}. \\boxed{{{gold}}}"


def boxed_answer(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (flat braces only: toy answers are integers)."""
    found = re.findall(_BOXED, text)
    return found[-1].strip() if found else None


def chat_messages(
    question_messages: list[dict[str, str]], system_prompt: str = TOY_SYSTEM_PROMPT
) -> list[dict]:
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
    model: Any, tokenizer: PreTrainedTokenizerFast, prompts: list[Any], max_new_tokens: int = 48, batch_size: int = 256
) -> float:
    """Share of `prompts` whose greedy response's last boxed answer equals the gold answer exactly."""
    import torch

    model.eval()
    correct = 0
    ids = _encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(x) for x in chunk)
        # Left padding, so every row's next token is predicted at the last position.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for text, p in zip(texts, prompts[start : start + batch_size], strict=True):
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
    return first[: max(n, 0)]


def _forward(
    model: Any, prefix: list[int], batch: list[tuple[list[int], list[int]]], pad: int
) -> tuple[Any, Any]:
    """Logits for (prompt suffix after the shared `prefix`, response + eos) pairs, right-padded, and the labels
    (-100 on prompt and padding: only response tokens count)."""
    import torch

    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    attention = torch.zeros((len(batch), len(prefix) + width), dtype=torch.long)
    attention[:, : len(prefix)] = 1
    for row, (p, a) in enumerate(batch):
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, len(prefix) : len(prefix) + len(seq)] = 1
        labels[row, len(p) : len(seq)] = torch.tensor(a)
    cache = None
    if prefix:
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(batch))
    out = model(input_ids=ids, attention_mask=attention, past_key_values=cache, use_cache=cache is not None)
    return out.logits[:, :-1].float(), labels[:, 1:]


def _sft_loss(model: Any, prefix: list[int], batch: list[tuple[list[int], list[int]]], pad: int) -> Any:
    """Mean next-token cross-entropy over the response tokens (prompt tokens carry no loss)."""
    import torch

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
    import torch

    model.eval()
    with torch.no_grad():
        logits, labels = _forward(model, prefix, batch, pad)
    hit = (logits.argmax(-1) == labels) | (labels == -100)
    return hit.all(dim=1).float().mean().item()


def toy_data(n_train: int | None = None) -> tuple[list[Any], list[Any]]:
    """The warm-up's train split and the held-out test split (the one the cluster evaluates on)."""
    from problems.toy import toy_splits

    return toy_splits(
        WARMUP["n_train"] if n_train is None else n_train,
        WARMUP["n_test"],
        digits=WARMUP["digits"],
        ops=WARMUP["ops"],
        seed=WARMUP["seed"],
    )


def _examples(
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[Any],
    prefix: list[int] | None = None,
) -> tuple[list[int], list[Example]]:
    """(shared prefix, examples) of `prompts`. Every toy prompt starts with the same tokens (template, system
    prompt, "What is"): that prefix runs once per step and its keys/values are reused for the whole batch (same
    math as the full forward, gradients flow into the prefix through the repeated cache; about a third fewer
    tokens per step). Pass the training prefix for the held-out prompts."""
    ids = _encode_prompts(tokenizer, prompts)
    responses = tokenizer(
        [toy_response(p.messages[-1]["content"], p.gold) for p in prompts], add_special_tokens=False
    )["input_ids"]
    if prefix is None:
        prefix = _common_prefix(ids)
    elif any(p[: len(prefix)] != prefix for p in ids):
        raise ValueError("held-out prompts do not share the training prompts' template prefix")
    eos = tokenizer.eos_token_id
    return prefix, [(p[len(prefix) :], [*resp, eos]) for p, resp in zip(ids, responses, strict=True)]


@dataclass
class _Run:
    """State of one warm-up: the recipe, the data, the optimizer and what was measured."""

    r: dict[str, Any]
    model: Any
    tokenizer: Any
    test: list[Any]
    prefix: list[int]
    examples: list[Example]
    test_examples: list[Example]
    opt: Any = None
    sched: Any = None
    rng: random.Random = field(default_factory=random.Random)
    order: list[int] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    step: int = 0
    loss: float = float("nan")
    accuracy: float = 0.0
    greedy_step: int = -1
    eval_every: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def train_step(self) -> None:
        import torch

        self.model.train()
        size = self.r["batch_size"]
        if len(self.order) < size:
            self.order += self.rng.sample(range(len(self.examples)), len(self.examples))
        batch = [self.examples[i] for i in self.order[:size]]
        del self.order[:size]
        loss = _sft_loss(self.model, self.prefix, batch, self.tokenizer.pad_token_id)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.loss = loss.item()

    def check(self) -> bool:
        """Held-out check (teacher-forced, then greedy once it reaches the target); True = stop here."""
        r = self.r
        tf_acc = _teacher_forced_accuracy(
            self.model, self.prefix, self.test_examples, self.tokenizer.pad_token_id
        )
        if tf_acc >= r["fine_eval_from"]:
            self.eval_every = r["fine_eval_every"]
        entry = {"step": self.step, "teacher_forced_accuracy": tf_acc, "loss": self.loss}
        if tf_acc >= r["target_accuracy"]:
            # Confirm with real greedy decoding (what the cluster measures) before stopping.
            self.accuracy, self.greedy_step = (
                greedy_accuracy(self.model, self.tokenizer, self.test),
                self.step,
            )
            entry["greedy_accuracy"] = self.accuracy
        entry["elapsed_s"] = time.monotonic() - self.t0
        self.history.append(entry)
        log.info(
            "warm-up step %d loss %.3f held-out %s",
            self.step,
            self.loss,
            {k: round(v, 3) for k, v in entry.items() if k.endswith("accuracy")},
        )
        return self.greedy_step == self.step and self.accuracy >= r["band"][0]

    def report(self) -> dict[str, Any]:
        r, (lo, hi) = self.r, self.r["band"]
        return {
            "held_out_accuracy": self.accuracy,
            "in_band": lo <= self.accuracy <= hi,
            "steps": self.step,
            "final_loss": self.loss,
            "history": self.history,
            "warmup_s": time.monotonic() - self.t0,
            "n_test": len(self.test),
            "recipe": {k: v for k, v in r.items() if k != "band"} | {"band": list(r["band"])},
        }


def warm_up(
    model: Any,
    tokenizer: PreTrainedTokenizerFast,
    train: list[Any],
    test: list[Any],
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Supervised fine-tuning on (chat-templated prompt, target response + eos), loss on response tokens only.

    Stops at the first evaluation with held-out greedy accuracy >= target (or at max_steps / the time budget)
    and returns a report: steps, accuracy history, seconds.
    """
    import torch

    r = {**WARMUP, **(recipe or {})}
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(r["threads"])
    try:
        torch.manual_seed(r["seed"])
        rng = random.Random(r["seed"])
        prefix, examples = _examples(tokenizer, train)
        opt = torch.optim.AdamW(
            model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"], betas=(0.9, 0.98)
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / r["warmup_steps"]))
        run = _Run(
            r,
            model,
            tokenizer,
            test,
            prefix,
            examples,
            _examples(tokenizer, test, prefix)[1],
            opt,
            sched,
            rng,
            t0=t0,
            eval_every=r["eval_every"],
        )
        while run.step < r["max_steps"]:
            if time.monotonic() - t0 > r["time_budget_s"]:
                log.warning("warm-up time budget of %.0f s spent at step %d", r["time_budget_s"], run.step)
                break
            run.train_step()
            if run.step % run.eval_every == 0 and run.check():
                break
        if run.greedy_step != run.step:
            run.accuracy = greedy_accuracy(model, tokenizer, test)
            run.history.append(
                {"step": run.step, "greedy_accuracy": run.accuracy, "elapsed_s": time.monotonic() - t0}
            )
        model.eval()
        return run.report()
    finally:
        torch.set_num_threads(threads)
