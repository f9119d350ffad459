"""`tbrm sft`: a warm-up stage before RL, by rejection-sampling fine-tuning (RFT) on the model's own answers.

    tbrm sft .cache/smollm2-135m-instruct .cache/smollm2-rft --data .cache/arith/train.parquet \
        --test .cache/arith/test.parquet --system-prompt "..." --samples 4 --prompts 400

Why: SmolLM2-135M-Instruct often computes small sums correctly in prose but rarely writes the final `\\boxed{}`
answer the reward grader needs, so RL from the raw model sees reward 0 almost always. RFT keeps only what the model
itself already produces correctly (no gold-answer text is ever trained on):

1. sample `samples` answers per training prompt at `temperature` with vLLM (the actor's engine), for the first
   `prompts` prompts;
2. grade them with the reward service's grader (`reward.grading`, the same verdicts RL rewards come from) and keep
   the correct ones (at most `keep_per_prompt` distinct answers per prompt);
3. a few epochs of masked next-token NLL (`learner.loss.sft_loss`) on (system + prompt, kept answer + eos), AdamW,
   bf16 autocast where available;
4. save an HF folder (safetensors, config, tokenizer) with `warmup.json`: the system prompt (which `tbrm up`
   then gives the actors), the recipe, the RFT statistics and the held-out greedy accuracy before and after.

The warm-up gain is reported here and in `warmup.json`, separately from the RL gain, which `tbrm up` measures from
the warmed-up model's own initial evaluation.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from buffer.schema import Prompt

log = logging.getLogger(__name__)

GOLD_TEMPLATE = "The answer is \\boxed{{{gold}}}."
"""Target of `targets = "gold"`: one short sentence with the boxed answer (the reward grader reads the box)."""
WARMUP_FILE = "warmup.json"
"""Read by the launcher (`system_prompt`) so that actors prompt the model as it was warmed up."""


class SftOptions(BaseModel):
    """Options of `tbrm sft` (CLI flags of the same names)."""

    model_config = ConfigDict(extra="forbid")

    targets: Literal["self", "gold"] = "self"
    """self: rejection sampling on the model's own correct answers (RFT); gold: the templated answer
    `GOLD_TEMPLATE` (short SFT on boxed answers, no sampling)."""
    system_prompt: str = ""
    """System turn of every prompt (sampling, training and evaluation); "" = none."""
    stop_at_accuracy: float | None = Field(default=None, gt=0, le=1)
    """gold targets only: stop once the held-out teacher-forced exact match of the gold answer reaches this (checked
    every `check_every` steps), so that RL starts from partial accuracy (None = train all epochs)."""
    check_every: int = Field(default=5, ge=1)
    prompts: int = Field(default=400, ge=1)
    """Training prompts to sample from (the first N of the data file)."""
    samples: int = Field(default=4, ge=1)
    """Answers sampled per prompt."""
    temperature: float = Field(default=1.0, ge=0.0)
    max_tokens: int = Field(default=48, ge=1)
    """Most new tokens per sampled answer (truncated answers are never kept)."""
    keep_per_prompt: int = Field(default=1, ge=1)
    """Distinct correct answers kept per prompt (1 = no prompt dominates the fine-tuning set)."""
    epochs: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-5, gt=0)
    autocast: str = "auto"
    """Mixed precision of the fine-tuning: "auto" (bfloat16 where native, see `learner.model.native_bf16`), "bfloat16" or "none"."""
    threads: int = Field(default=2, ge=1)
    eval_size: int = Field(default=100, ge=0)
    """Held-out prompts evaluated greedily before and after (0 = no evaluation)."""
    eval_max_tokens: int = Field(default=48, ge=1)
    seed: int = 0


class SftReport(BaseModel):
    """What `tbrm sft` did: the sampling statistics, the fine-tuning and the held-out accuracy around it."""

    sampled: int = 0
    correct: int = 0
    boxed: int = 0
    kept: int = 0
    prompts_with_correct: int = 0
    steps: int = 0
    final_loss: float | None = None
    checks: list[dict[str, float]] = Field(default_factory=list)
    """gold targets: (step, held-out teacher-forced exact match) at each check."""
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    no_answer_before: int | None = None
    no_answer_after: int | None = None
    eval_n: int = 0
    sample_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0


def _engine(model_dir: str | Path, opts: SftOptions, max_len: int = 512) -> Any:
    from actor_service.engine import ActorEngine  # vLLM

    return ActorEngine(model_dir, dtype="float32", max_model_len=max_len, kv_cache_bytes=256 * 2**20,
                       seed=opts.seed, threads=opts.threads)  # fmt: skip


def greedy_accuracy(engine: Any, prompts: Sequence[Prompt], opts: SftOptions) -> tuple[float, int]:
    """(accuracy, no-answer count) of greedy answers on `prompts`, graded like the reward service."""
    from deploy.evaluation import grade

    ids = engine.chat_token_ids_batch([p.messages for p in prompts], opts.system_prompt or None)
    gen = engine.generate(ids, n=1, temperature=0.0, max_tokens=opts.eval_max_tokens, seed=opts.seed)
    status = [grade(g[0].text, p.gold) for g, p in zip(gen.samples, prompts, strict=True)]
    return status.count("correct") / max(1, len(prompts)), status.count("no_answer")


def collect(engine: Any, prompts: Sequence[Prompt], opts: SftOptions, report: SftReport) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids ending in eos) of the model's own correct answers (step 1-2 of the docstring)."""
    from deploy.evaluation import grade

    eos = engine.tokenizer.eos_token_id
    ids = engine.chat_token_ids_batch([p.messages for p in prompts], opts.system_prompt or None)
    gen = engine.generate(ids, n=opts.samples, temperature=opts.temperature, max_tokens=opts.max_tokens,
                          seed=opts.seed)  # fmt: skip
    pairs: list[tuple[list[int], list[int]]] = []
    for p, pid, group in zip(prompts, ids, gen.samples, strict=True):
        seen: set[tuple[int, ...]] = set()
        for s in group:
            report.sampled += 1
            status = grade(s.text, p.gold)
            report.boxed += status != "no_answer"
            if status != "correct" or s.finish_reason != "stop":
                continue
            report.correct += 1
            resp = list(s.token_ids)
            if not resp or resp[-1] != eos:
                resp.append(eos)  # the model must learn to stop after its answer
            if tuple(resp) in seen or len(seen) >= opts.keep_per_prompt:
                continue
            seen.add(tuple(resp))
            pairs.append((pid, resp))
        report.prompts_with_correct += bool(seen)
    report.kept = len(pairs)
    return pairs


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str) -> list[int]:
    """Prompt token ids exactly as the actor builds them (`ActorEngine.chat_token_ids`)."""
    msgs = list(messages)
    if system_prompt and not (msgs and msgs[0].get("role") == "system"):
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def gold_pairs(tokenizer: Any, prompts: Sequence[Prompt], system_prompt: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, `GOLD_TEMPLATE` answer ids + eos) per prompt."""
    eos = tokenizer.eos_token_id
    return [
        (chat_ids(tokenizer, p.messages, system_prompt),
         [*tokenizer.encode(GOLD_TEMPLATE.format(gold=p.gold), add_special_tokens=False), eos])
        for p in prompts
    ]  # fmt: skip


def exact_match(model: Any, pairs: list[tuple[list[int], list[int]]], batch_size: int = 32) -> float:
    """Fraction of pairs whose every answer token is the model's argmax (teacher-forced): a lower bound of greedy
    accuracy in the target format, one forward pass per batch instead of a generation."""
    import torch

    from learner.model import collate, response_logits

    trajs = _to_trajectories(pairs)
    hits = 0
    with torch.no_grad():
        for i in range(0, len(trajs), batch_size):
            mb = collate(trajs[i : i + batch_size])
            ok = (response_logits(model, mb, "bfloat16").argmax(-1) == mb.tokens) | ~mb.mask.bool()
            hits += int(ok.all(dim=1).sum())
    return hits / max(1, len(trajs))


def _to_trajectories(pairs: list[tuple[list[int], list[int]]]) -> list[Any]:
    from buffer.schema import Trajectory

    return [
        Trajectory(prompt_id=f"sft-{i}", group_id=f"sft-{i}", prompt_token_ids=p, response_token_ids=r,
                   behaviour_logprobs=[0.0] * len(r), reward=1.0, grade_status="correct", policy_version=0)  # fmt: skip
        for i, (p, r) in enumerate(pairs)
    ]


def fine_tune(
    model_dir: str | Path, pairs: list[tuple[list[int], list[int]]], opts: SftOptions, report: SftReport,
    check_pairs: list[tuple[list[int], list[int]]] | None = None,
) -> Any:
    """Masked NLL on the kept answers (step 3); returns the trained model. With `check_pairs` and
    `opts.stop_at_accuracy`, stops early once their teacher-forced exact match reaches it."""
    import torch

    from learner.loss import sft_loss
    from learner.model import autocast_context, collate, load_causal_lm, response_logits

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    model = load_causal_lm(model_dir, "float32", trainable=True)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0)
    trajs = _to_trajectories(pairs)
    rng = random.Random(opts.seed)
    steps = max(1, round(opts.epochs * len(trajs) / opts.batch_size))
    order: list[int] = []
    for step in range(steps):
        if len(order) < opts.batch_size:
            order += rng.sample(range(len(trajs)), len(trajs))
        batch, order = order[: opts.batch_size], order[opts.batch_size :]
        mb = collate([trajs[i] for i in batch])
        with autocast_context(model, opts.autocast):
            logits = response_logits(model, mb)
        loss, _ = sft_loss(logits, mb.tokens, mb.mask)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        report.final_loss = float(loss)
        report.steps = step + 1
        if step % 10 == 0 or step == steps - 1:
            log.info("sft step %d/%d loss %.4f", step + 1, steps, report.final_loss)
        if check_pairs and opts.stop_at_accuracy is not None and (step + 1) % opts.check_every == 0:
            em = exact_match(model.eval(), check_pairs)
            model.train()
            report.checks.append({"step": step + 1, "exact_match": em})
            log.info("sft step %d: held-out teacher-forced exact match %.3f", step + 1, em)
            if em >= opts.stop_at_accuracy:
                break
    return model.eval()


def save_model(model: Any, base_dir: str | Path, out_dir: Path) -> None:
    """The fine-tuned weights with the base folder's tokenizer and generation config, as an HF folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for f in Path(base_dir).iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja")):
            shutil.copy2(f, out_dir / f.name)


def run_sft(
    model_dir: str | Path, out_dir: str | Path, train: Sequence[Prompt], test: Sequence[Prompt], opts: SftOptions
) -> SftReport:
    """The whole warm-up (see the module docstring); writes `out_dir` and returns the report."""
    out = Path(out_dir)
    report = SftReport(eval_n=min(opts.eval_size, len(test)))
    held_out = list(test[: opts.eval_size])
    check_pairs = pairs = None
    if opts.targets == "gold":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        pairs = gold_pairs(tok, train[: opts.prompts], opts.system_prompt)
        check_pairs = gold_pairs(tok, test, opts.system_prompt) if test else None
        report.kept = len(pairs)
    if held_out or pairs is None:
        engine = _engine(model_dir, opts)
        try:
            t0 = time.perf_counter()
            if held_out:
                report.accuracy_before, report.no_answer_before = greedy_accuracy(engine, held_out, opts)
            report.eval_s += time.perf_counter() - t0
            if pairs is None:
                t0 = time.perf_counter()
                pairs = collect(engine, list(train[: opts.prompts]), opts, report)
                report.sample_s = time.perf_counter() - t0
                log.info("RFT: %d of %d sampled answers correct, %d kept", report.correct, report.sampled, report.kept)
        finally:
            engine.close()
    if not pairs:
        raise RuntimeError(
            f"no correct answer among {report.sampled} samples ({report.boxed} boxed): nothing to fine-tune on; "
            "try another --system-prompt, more --samples or an easier task"
        )
    t0 = time.perf_counter()
    model = fine_tune(model_dir, pairs, opts, report, check_pairs)
    report.train_s = time.perf_counter() - t0
    save_model(model, model_dir, out)
    del model
    if held_out:
        t0 = time.perf_counter()
        engine = _engine(out, opts)
        try:
            report.accuracy_after, report.no_answer_after = greedy_accuracy(engine, held_out, opts)
        finally:
            engine.close()
        report.eval_s += time.perf_counter() - t0
    record = {"system_prompt": opts.system_prompt, "method": "rft" if opts.targets == "self" else "sft-gold", "base_model": str(Path(model_dir).resolve()),
              "options": opts.model_dump(), "report": report.model_dump()}  # fmt: skip
    (out / WARMUP_FILE).write_text(json.dumps(record, indent=2))
    return report
