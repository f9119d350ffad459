"""Wire format of the actor's weight endpoint (docs/weight-protocol.md). Light module: pydantic only.

`POST {actor}/v1/weights`
  headers: Authorization: Bearer <token>, X-TBRM-Policy-Version: <int>, X-TBRM-Sha256: <hex of body>,
           Content-Type: application/octet-stream
  body:    a safetensors file with HF parameter names (never pickle)
  200 -> WeightUpdateResponse; 400 malformed/mismatched tensors or checksum; 401 token; 409 version not newer;
  413 body too large. With an `X-TBRM-Relay` header the actor also streams the body on to the actors it names
  and lists their answers in `relayed`. The response carries the log-probs of a fixed canary sequence under the
  applied weights (verified delivery: the learner compares them with its own).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VERSION_HEADER = "X-TBRM-Policy-Version"
SHA256_HEADER = "X-TBRM-Sha256"
RELAY_HEADER = "X-TBRM-Relay"
"""Comma-separated base URLs of further actors the receiving actor streams the body on to (a chain: it sends to
the first, naming the rest in the same header), docs/weight-protocol.md#fan-out."""

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
TOY_SYSTEM_PROMPT = "Answer in \\boxed{}."
"""The short system turn the toy model was warmed up with (deploy.toy_warmup)."""



CANARY_LENGTH = 48
CANARY_MAX_TOKEN = 4096


def canary_token_ids(vocab_rows: int, length: int = CANARY_LENGTH) -> list[int]:
    """The fixed canary sequence both sides score after a push: `length` token ids below min(vocab_rows, 4096)
    from a fixed linear congruential stream (no RNG library: the same ids on every machine and version)."""
    bound = max(2, min(vocab_rows, CANARY_MAX_TOKEN))
    x, out = 12345, []
    for _ in range(length):
        x = (1103515245 * x + 12345) % 2**31
        out.append((x >> 8) % bound)
    return out


class RelayHop(BaseModel):
    """One actor's answer to a relayed push, as the actor that forwarded it to that one saw it."""

    url: str
    status: int | None = Field(description="HTTP status of its answer (None: unreachable, timed out, cut off)")
    detail: str = Field(default="", description="the refusal or transport error when status is not 200")
    policy_version: int | None = None
    receive_s: float = 0.0
    load_s: float = 0.0
    canary_logprobs: list[float] | None = None
    canary_version: int | None = None


class WeightUpdateResponse(BaseModel):
    policy_version: int
    sha256: str
    nbytes: int
    receive_s: float = Field(description="seconds spent receiving and verifying the body")
    load_s: float = Field(description="seconds spent applying the weights to the running engine")
    canary_s: float = Field(default=0.0, description="seconds spent scoring the canary after the apply")
    canary_logprobs: list[float] | None = Field(
        default=None,
        description="log pi(t_i | t_<i) of the canary sequence (canary_token_ids, tokens 1..) under the weights "
                    "just applied; the learner compares them with its own for the same version",
    )
    canary_version: int | None = Field(
        default=None,
        description="the weights version the canary was scored under: policy_version, unless a newer version (a "
                    "catch-up from the learner's file) was applied between this push's apply and the scoring",
    )
    relayed: list[RelayHop] = Field(
        default_factory=list,
        description="answers of the actors this push was relayed to (X-TBRM-Relay), in the order they were "
                    "tried: the next actor's own answer, then the ones it relayed to; an actor not listed was "
                    "not reached",
    )


class ActorHealth(BaseModel):
    """`GET /health`: "starting" until the engine is loaded."""

    status: Literal["ok", "starting"]
    actor_id: str
    policy_version: int | None
    state: str


class ActorStatus(BaseModel):
    actor_id: str
    policy_version: int
    model: str
    state: str
    trajectories: int = 0
    tokens_generated: int = 0
    tokens_per_s: float = 0.0
    last_batch_s: float = 0.0
    last_update_s: float = 0.0
    trajectories_per_s: float = 0.0
    """Trajectories inserted per second over the recent window."""
    weight_updates: int = 0
    """Weight pushes (and catch-up loads) applied since start."""
    pushes_refused: int = 0
    """Weight pushes answered with a 4xx since start."""
    prompts_in_flight: int = 0
    """Prompts claimed from the queue and not yet finished or given back."""
    loop_enabled: bool = True
    """False when the actor only serves /v1/generate and /v1/weights (no sampling loop)."""
    last_error: str | None = None
    """Most recent recoverable error of the sampling loop (reward or Redis unavailable, ...)."""


MAX_GENERATE_PROMPTS = 256  # = generate_max_samples: a 200-problem held-out set is one engine call (one version)
"""Most prompts one `POST /v1/generate` may carry (it runs on the shared engine, between training batches)."""


class GenerateRequest(BaseModel):
    """`POST /v1/generate`: read-only generation on the current weights (eval, tests, smoke checks)."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1, max_length=MAX_GENERATE_PROMPTS)
    """Prompt texts: user messages (chat=True) or raw text fed to the tokenizer as is (chat=False)."""
    chat: bool = True
    """Wrap each prompt as a user turn after the actor's system prompt and apply the chat template."""
    max_tokens: int = Field(default=64, ge=1, le=8192)
    """Most new tokens per response (also clipped to the engine's max_model_len)."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0 = greedy; vLLM accepts at most 2."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    """Samples per prompt."""
    seed: int | None = None
    """Per-request sampling seed (None = the engine's random stream)."""
    logprobs: bool = False
    """Return the log-probability of each generated token."""


class GeneratedSample(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None


class GenerateResult(BaseModel):
    prompt_token_ids: list[int]
    samples: list[GeneratedSample]


class GenerateResponse(BaseModel):
    policy_version: int
    """Weights version at the first token of these samples (with in-flight updates a push may land while they
    are generated; then later tokens come from the newer weights)."""
    results: list[GenerateResult]
    """One entry per prompt, in request order."""
    latency_s: float

