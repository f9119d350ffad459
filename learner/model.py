"""Model helpers of the learner: load HF models, pad trajectories into micro-batches, logits at response positions.

Layout of one padded micro-batch (B rows): prompts are LEFT-padded to the longest prompt P, responses RIGHT-padded
to the longest response T, so every row's last prompt token sits at column P-1 and

    logits[:, P-1 + h]  predicts response token h (h = 0 .. T-1);  column P-1 is the state s_1.

The policy logits the loss needs are therefore one contiguous slice, and `logits_to_keep=T+1` lets the model skip
the LM head on the prompt. Position ids count only real tokens, so padding changes no real token's logits.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from buffer.schema import Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_causal_lm(path: str | Path, dtype: str = "float32", trainable: bool = True) -> PreTrainedModel:
    """Load an HF causal LM from a local folder (offline). A frozen model is put in eval mode without grads."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), local_files_only=True)
    # No dropout in the objective: the residual must be a deterministic function of the parameters.
    model.config.use_cache = False
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


@dataclass
class MicroBatch:
    """Padded tensors of B trajectories (see the module docstring for the layout)."""

    rows: list[int]
    """Indices of these trajectories in the step's batch."""
    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    position_ids: torch.Tensor  # [B, P+T]
    prompt_len: int  # P
    tokens: torch.Tensor  # [B, T] response tokens (0 at padding)
    mask: torch.Tensor  # [B, T] float, 1 at real response tokens
    rewards: torch.Tensor  # [B]
    behaviour_logprobs: torch.Tensor  # [B, T]

    def to(self, device: torch.device | str) -> MicroBatch:
        """The same micro-batch with every tensor on `device`."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens in the micro-batch: what the model actually processes."""
        return int(self.attention_mask.sum())


def collate(trajs: list[Trajectory], rows: list[int] | None = None, pad_id: int = 0) -> MicroBatch:
    """Pad trajectories into one micro-batch (prompts left-padded, responses right-padded)."""
    if not trajs:
        raise ValueError("collate needs at least one trajectory")
    B = len(trajs)
    P = max(len(t.prompt_token_ids) for t in trajs)
    # T >= 1 so that an empty response still has its state s_1 (V(s_1) enters the residual).
    T = max(1, max(len(t.response_token_ids) for t in trajs))
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + T), dtype=torch.long)
    tokens = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    behaviour = torch.zeros((B, T), dtype=torch.float32)
    for i, t in enumerate(trajs):
        p, r = len(t.prompt_token_ids), len(t.response_token_ids)
        input_ids[i, P - p : P] = torch.tensor(t.prompt_token_ids)
        attention[i, P - p : P + r] = 1
        if r:
            input_ids[i, P : P + r] = torch.tensor(t.response_token_ids)
            tokens[i, :r] = torch.tensor(t.response_token_ids)
            mask[i, :r] = 1.0
            behaviour[i, :r] = torch.tensor(t.behaviour_logprobs)
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return MicroBatch(
        rows=list(range(B)) if rows is None else rows,
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        prompt_len=P,
        tokens=tokens,
        mask=mask,
        rewards=torch.tensor([t.reward for t in trajs], dtype=torch.float32),
        behaviour_logprobs=behaviour,
    )


def plan_micro_batches(
    trajs: list[Trajectory], micro_batch_size: int, max_tokens: int | None = None, group_aligned: bool = False
) -> list[list[int]]:
    """Split batch indices into micro-batches of at most `micro_batch_size` rows (and `max_tokens` padded tokens).

    `group_aligned` keeps the samples of one group (same `group_id`) in one micro-batch where the group fits,
    so a group-relative loss (GRPO, centered TBRM) sees whole groups. Order is otherwise the batch order
    (deterministic).
    """
    order = list(range(len(trajs)))
    if group_aligned:
        first: dict[str, int] = {}
        for i, t in enumerate(trajs):
            first.setdefault(t.group_id, i)
        order.sort(key=lambda i: (first[trajs[i].group_id], i))
    plans: list[list[int]] = []
    cur: list[int] = []
    cur_p = cur_r = 0

    def fits(i: int) -> bool:
        if len(cur) >= micro_batch_size:
            return False
        if group_aligned and cur and trajs[i].group_id != trajs[cur[-1]].group_id:
            # start a new micro-batch at a group boundary if the whole next group would not fit
            size = sum(1 for t in trajs if t.group_id == trajs[i].group_id)
            if len(cur) + size > micro_batch_size:
                return False
        if max_tokens is None:
            return True
        p = max(cur_p, len(trajs[i].prompt_token_ids))
        r = max(cur_r, len(trajs[i].response_token_ids), 1)
        return (len(cur) + 1) * (p + r) <= max_tokens or not cur

    for i in order:
        if not fits(i):
            plans.append(cur)
            cur, cur_p, cur_r = [], 0, 0
        cur.append(i)
        cur_p = max(cur_p, len(trajs[i].prompt_token_ids))
        cur_r = max(cur_r, len(trajs[i].response_token_ids), 1)
    if cur:
        plans.append(cur)
    return plans


def native_bf16(device: str) -> bool:
    """True where bf16 matmuls run natively: a CUDA device, or a CPU with AVX512-BF16 or AMX. On other CPUs
    (e.g. AVX2 only) torch emulates bf16, which is many times slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return device == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_context(model: torch.nn.Module, autocast: str | None) -> AbstractContextManager[object]:
    """`torch.autocast` on the model's device for `autocast` = "bfloat16"/"float16"; a no-op for None/"float32";
    "auto" = bfloat16 where the device runs it natively (`native_bf16`), else fp32.

    Mixed precision keeps fp32 master weights (AdamW's small updates survive) while the matmuls run in bf16: on
    CPUs with AVX512-BF16/AMX a SmolLM2-135M step is 1.4x faster (bench/learner_smollm2.py); on an AVX2-only CPU
    bf16 is emulated and many times slower than fp32 (README, real model on CPU), hence "auto".
    """
    if autocast in (None, "none", "float32"):
        return nullcontext()
    device = next(model.parameters()).device.type
    if autocast == "auto":
        if not native_bf16(device):
            return nullcontext()
        autocast = "bfloat16"
    return torch.autocast(device, dtype=getattr(torch, autocast))


def response_logits(model: torch.nn.Module, mb: MicroBatch, autocast: str | None = None) -> torch.Tensor:
    """Logits [B, T, V] at the positions that predict the response tokens (column 0 is the state s_1), fp32."""
    T = mb.tokens.shape[1]
    with autocast_context(model, autocast):
        out = model(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            logits_to_keep=T + 1,
            use_cache=False,
        )
    # kept positions are P-1 .. P+T-1; the last one predicts nothing
    return out.logits[:, :T].float()


def _base_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformer body, LM head) of an HF causal LM, also behind a DeepSpeed engine (`.module`)."""
    inner = getattr(model, "module", model)
    return inner.get_decoder(), inner.get_output_embeddings()


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    logits = head(hidden)  # [B, c, V]: alive only inside this chunk (recomputed in the backward)
    logits = logits if logits.dtype == torch.float64 else logits.float()  # at least fp32 (fp64 kept: exact tests)
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse, lse


def response_logprobs(
    model: torch.nn.Module, mb: MicroBatch, autocast: str | None = None, chunk: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a_h | s_h) [B, T] and V(s_1) = logsumexp(z_1) [B] (fp32, differentiable) without a [B, T, V] tensor.

    The LM head and the logsumexp over the vocabulary run on `chunk` response positions at a time under activation
    checkpointing, so only [B, T, H] hidden states are kept for the backward and at most [B, chunk, V] logits exist
    at once (SmolLM2's 49k vocabulary: 16 x 256 x 49152 fp32 logits would be 805 MB, twice with their gradient).
    Same values as `learner.loss.token_logprobs(response_logits(...))`; padded positions gather token 0.
    """
    from torch.utils.checkpoint import checkpoint

    T = mb.tokens.shape[1]
    P = mb.prompt_len
    body, head = _base_and_head(model)
    with autocast_context(model, autocast):
        hidden = body(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids, use_cache=False
        ).last_hidden_state[:, P - 1 : P - 1 + T]  # [B, T, H]: the states s_1 .. s_T
        tokens = mb.tokens * mb.mask.long()
        parts = [
            checkpoint(_chunk_logprobs, head, hidden[:, i : i + chunk], tokens[:, i : i + chunk], use_reentrant=False)
            if torch.is_grad_enabled()
            else _chunk_logprobs(head, hidden[:, i : i + chunk], tokens[:, i : i + chunk])
            for i in range(0, T, chunk)
        ]
    logp = torch.cat([p[0] for p in parts], dim=1)
    lse0 = parts[0][1][:, 0]
    return logp, lse0


@torch.no_grad()
def reference_logprobs(
    ref_model: torch.nn.Module, mb: MicroBatch, autocast: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref(a_h | s_h) [B, T] of the response tokens (0 at padding) and V_ref(s_1) = logsumexp(z_ref_1) [B]."""
    logp, v0 = response_logprobs(ref_model, mb, autocast)
    return logp * mb.mask, v0
